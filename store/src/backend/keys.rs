//! How index entries are spelled in sled: the keys (tag byte, then
//! big-endian integers so byte order is numeric order) and the values'
//! encodings, with a cursor that names what it was reading when bytes run
//! out. The layout itself is documented in `backend.rs`.

use uuid::Uuid;

use super::Run;
use crate::error::{Result, StoreError};

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) struct Chunk {
    pub(super) first_seq: u64,
    pub(super) offset: u64,
    pub(super) lengths: Vec<u32>,
}

impl Chunk {
    #[cfg(feature = "test-hooks")]
    pub(super) fn end_seq(&self) -> u64 {
        self.first_seq + self.lengths.len() as u64
    }
    pub(super) fn byte_len(&self) -> u64 {
        self.lengths.iter().map(|&l| l as u64 + 1).sum()
    }
}

pub(super) fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub(super) fn chunk_key(seq: u64) -> Vec<u8> {
    key(b'c', &[&seq.to_be_bytes()])
}

pub(super) fn run_key(stream: &str, version: u64) -> Vec<u8> {
    key(b's', &[stream.as_bytes(), &[0], &version.to_be_bytes()])
}

pub(super) fn stream_head_key(stream: &str) -> Vec<u8> {
    key(b'h', &[stream.as_bytes()])
}

pub(super) fn id_prefix(id: &Uuid) -> [u8; 6] {
    id.as_bytes()[..6].try_into().expect("uuid has 16 bytes")
}

/// Reads fixed-width big-endian integers, naming what it was reading when
/// the bytes run out.
pub(super) struct Cursor<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) what: &'static str,
}

impl Cursor<'_> {
    pub(super) fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let [b] = self.take::<1>()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(StoreError::Backend(format!(
            "{}: varint too long",
            self.what
        )))
    }
    pub(super) fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        if self.bytes.len() < N {
            return Err(StoreError::Backend(format!(
                "{}: entry ends early ({} bytes left, {N} needed)",
                self.what,
                self.bytes.len()
            )));
        }
        let (head, rest) = self.bytes.split_at(N);
        self.bytes = rest;
        Ok(head.try_into().expect("split at N"))
    }
    pub(super) fn u64(&mut self) -> Result<u64> {
        self.take::<8>().map(u64::from_be_bytes)
    }
    pub(super) fn u32(&mut self) -> Result<u32> {
        self.take::<4>().map(u32::from_be_bytes)
    }
}

pub(super) fn decode_chunk(k: &[u8], v: &[u8]) -> Result<Chunk> {
    let first_seq = Cursor {
        bytes: &k[1..],
        what: "chunk key",
    }
    .u64()?;
    let mut c = Cursor {
        bytes: v,
        what: "chunk index",
    };
    let offset = c.u64()?;
    let count = c.u32()? as usize;
    let lengths = (0..count).map(|_| c.u32()).collect::<Result<Vec<_>>>()?;
    Ok(Chunk {
        first_seq,
        offset,
        lengths,
    })
}

pub(super) fn decode_run(v: &[u8], first_version: u64) -> Result<Run> {
    let mut c = Cursor {
        bytes: v,
        what: "stream index",
    };
    Ok(Run {
        first_version,
        first_seq: c.u64()?,
        count: c.u64()?,
    })
}
