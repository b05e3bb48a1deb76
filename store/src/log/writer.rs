//! The one thread that appends: it drains queued requests, checks each
//! one's expected version, writes the group's records, syncs once, indexes
//! them, and only then answers everyone (group commit).

use super::*;

/// The writer thread's state: the committed head and a cache of stream versions.
pub(super) struct Writer {
    backend: Arc<Backend>,
    head: Head,
    versions: HashMap<String, u64>,
    poisoned: Option<String>,
    /// The staging buffer, kept between groups: a fresh multi-megabyte
    /// buffer per group costs page faults in the writer and in `write`.
    buffer: Vec<u8>,
}

enum Outcome {
    Reply(Result<AppendResult>),
    /// Accepted into the group; acknowledged only after the commit.
    Pending(AppendResult),
}

/// What the requests of one group have staged so far.
struct Staged {
    bytes: Vec<u8>,
    write: GroupIndex,
    seq: u64,
    hash: String,
    ids: HashMap<Uuid, u64>,
    now_ms: u64,
}

impl Writer {
    pub(super) fn new(backend: Arc<Backend>, head: Head) -> Self {
        Writer {
            backend,
            head,
            versions: HashMap::new(),
            poisoned: None,
            buffer: Vec::new(),
        }
    }

    pub(super) fn run(
        mut self,
        rx: mpsc::Receiver<AppendRequest>,
        shared: std::sync::Weak<Shared>,
    ) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut events = group[0].events.len();
            while events < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(r) => {
                        events += r.events.len();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group, &shared);
        }
    }

    fn version_of(&mut self, stream: &str, staged: &GroupIndex) -> Result<u64> {
        if let Some(v) = staged.stream_versions.get(stream) {
            return Ok(*v);
        }
        if let Some(v) = self.versions.get(stream) {
            return Ok(*v);
        }
        let v = self.backend.stream_version(stream)?;
        self.versions.insert(stream.to_string(), v);
        Ok(v)
    }

    /// Commit a group, publish the new head, then acknowledge: a caller that
    /// got its reply can read what it wrote.
    fn commit_group(&mut self, group: Vec<AppendRequest>, shared: &std::sync::Weak<Shared>) {
        if let Some(reason) = &self.poisoned {
            for req in group {
                let _ = req.reply.send(Err(StoreError::Poisoned(reason.clone())));
            }
            return;
        }
        let mut staged = Staged {
            bytes: std::mem::take(&mut self.buffer),
            write: GroupIndex {
                first_seq: self.head.seq + 1,
                ..GroupIndex::default()
            },
            seq: self.head.seq,
            hash: self.head.hash.clone(),
            ids: HashMap::new(),
            now_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64,
        };
        let mut outcomes = Vec::with_capacity(group.len());
        for req in group {
            let outcome = self.stage(&req, &mut staged);
            outcomes.push((req.reply, outcome));
        }
        let commit: Option<Result<()>> = if staged.seq > self.head.seq {
            staged.write.head_hash = staged.hash.clone();
            let versions = staged.write.stream_versions.clone();
            let at = self.head.log_end;
            // Refuse before writing when the disk is nearly full: the index
            // (sled) must never be the one to hit ENOSPC, since sled stops
            // for good after a failed write, and only a reopen heals it.
            let needed = FREE_SPACE_RESERVE + 2 * staged.bytes.len() as u64;
            let written = if self.backend.free_bytes().is_some_and(|free| free < needed) {
                Err(StoreError::NoSpace)
            } else {
                self.backend.write_records(&staged.bytes, at)
            };
            let outcome = match written {
                Ok(()) => match self.backend.index(staged.write, at) {
                    Ok(log_end) => {
                        self.head = Head {
                            seq: staged.seq,
                            hash: staged.hash,
                            log_end,
                        };
                        self.versions.extend(versions);
                        Ok(())
                    }
                    // The records are durable but the index is not: only a
                    // reopen (which re-indexes the file's tail) can go on.
                    Err(e) => {
                        self.poisoned = Some(e.to_string());
                        Err(StoreError::Poisoned(e.to_string()))
                    }
                },
                // Nothing of this group was acknowledged: cut whatever part
                // reached the file and keep taking writes (a full disk
                // recovers when space returns). If even the cut fails, the
                // file's end is unknown and only a reopen can tell.
                Err(StoreError::NoSpace) => Err(StoreError::NoSpace), // refused before writing
                Err(e) => {
                    let no_space = matches!(&e, StoreError::Io { source, .. }
                        if source.raw_os_error() == Some(28) /* ENOSPC */
                            || source.kind() == std::io::ErrorKind::StorageFull);
                    match self.backend.truncate(at) {
                        Ok(()) if no_space => Err(StoreError::NoSpace),
                        Ok(()) => Err(e),
                        Err(cut) => {
                            self.poisoned =
                                Some(format!("{e}; then cutting the partial write failed: {cut}"));
                            Err(StoreError::Poisoned(
                                self.poisoned.clone().unwrap_or_default(),
                            ))
                        }
                    }
                }
            };
            // The staging buffer is kept for the next group, whatever happened.
            self.buffer = std::mem::take(&mut staged.bytes);
            self.buffer.clear();
            Some(outcome)
        } else {
            None // every request was answered while staging
        };
        let committed = matches!(commit, Some(Ok(())));
        if committed {
            if let Some(shared) = shared.upgrade() {
                shared.head_watch.send_replace(self.head.seq);
            }
        }
        for (reply, outcome) in outcomes {
            let result = match outcome {
                Outcome::Reply(r) => r,
                Outcome::Pending(r) if committed => Ok(r),
                Outcome::Pending(_) => Err(match &commit {
                    Some(Err(StoreError::NoSpace)) => StoreError::NoSpace,
                    Some(Err(StoreError::Poisoned(why))) => StoreError::Poisoned(why.clone()),
                    Some(Err(e)) => {
                        StoreError::Backend(format!("the append was not recorded: {e}"))
                    }
                    _ => StoreError::Backend("the append was not recorded".into()),
                }),
            };
            let _ = reply.send(result);
        }
    }

    /// Sequences of the request's ids that are already stored or staged.
    fn known_ids(&self, req: &AppendRequest, staged: &Staged) -> Result<Vec<u64>> {
        let mut stored: HashMap<Uuid, u64> = HashMap::new();
        let mut scanned: Vec<[u8; 6]> = Vec::new();
        let mut known = Vec::new();
        for e in &req.events {
            if let Some(seq) = staged.ids.get(&e.id) {
                known.push(*seq);
                continue;
            }
            let prefix: [u8; 6] = e.id.as_bytes()[..6].try_into().expect("16 bytes");
            if !scanned.contains(&prefix) {
                scanned.push(prefix);
                stored.extend(self.backend.ids_like(&e.id)?);
            }
            if let Some(seq) = stored.get(&e.id) {
                known.push(*seq);
            }
        }
        Ok(known)
    }

    fn stage(&mut self, req: &AppendRequest, staged: &mut Staged) -> Outcome {
        // Idempotency: sequences of ids already stored or staged.
        let known = match self.known_ids(req, staged) {
            Ok(k) => k,
            Err(e) => return Outcome::Reply(Err(e)),
        };
        let current = match self.version_of(&req.stream, &staged.write) {
            Ok(v) => v,
            Err(e) => return Outcome::Reply(Err(e)),
        };
        if !known.is_empty() {
            if known.len() != req.events.len() {
                return Outcome::Reply(Err(StoreError::PartialDuplicate {
                    stream: req.stream.clone(),
                    stored: known.len(),
                    total: req.events.len(),
                }));
            }
            return Outcome::Reply(Ok(AppendResult {
                first_seq: known.iter().copied().min().unwrap_or(0),
                last_seq: known.iter().copied().max().unwrap_or(0),
                version: current,
                duplicate: true,
            }));
        }
        if !req.expected.admits(current) {
            return Outcome::Reply(Err(StoreError::Conflict {
                stream: req.stream.clone(),
                expected: req.expected.to_string(),
                current,
            }));
        }
        let first_seq = staged.seq + 1;
        let mut version = current;
        let w = &mut staged.write;
        let bytes = &mut staged.bytes;
        let json = |s: &str| serde_json::to_vec(s).expect("a string serializes");
        let stream_json = json(&req.stream);
        let mut type_json: (&str, Vec<u8>) = ("", Vec::new());
        for e in &req.events {
            staged.seq += 1;
            version += 1;
            if type_json.0 != e.event_type {
                type_json = (&e.event_type, json(&e.event_type));
            }
            let start = bytes.len();
            write_record(
                bytes,
                &RecordParts {
                    seq: staged.seq,
                    id: &e.id,
                    stream_json: &stream_json,
                    version,
                    event_type_json: &type_json.1,
                    schema_version: e.schema_version,
                    timestamp_ms: staged.now_ms,
                    payload: &e.payload,
                    causation_id: e.causation_id,
                    correlation_id: e.correlation_id,
                    prev_hash: &staged.hash,
                },
            );
            staged.hash = sha256_hex(&bytes[start..]);
            w.lengths.push((bytes.len() - start) as u32);
            bytes.push(b'\n');
            w.ids.push((e.id, staged.seq));
            staged.ids.insert(e.id, staged.seq);
        }
        w.runs.push((
            req.stream.clone(),
            Run {
                first_version: current + 1,
                first_seq,
                count: req.events.len() as u64,
            },
        ));
        w.stream_versions.insert(req.stream.clone(), version);
        Outcome::Pending(AppendResult {
            first_seq,
            last_seq: staged.seq,
            version,
            duplicate: false,
        })
    }
}
