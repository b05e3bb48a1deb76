//! Blob store: dedup, trees, and a flipped byte caught on read and by verify.

use std::io::Read;

use herd_store::{Store, StoreError};

#[test]
fn same_content_is_stored_once_and_trees_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.blobs.put_bytes(b"hello").unwrap();
    let b = store.blobs.put_bytes(b"hello").unwrap();
    assert_eq!(a.id, b.id);
    assert!(!a.existed && b.existed);
    assert_eq!(
        a.id,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );

    let src = dir.path().join("model");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("config.json"), b"{}").unwrap();
    std::fs::write(src.join("model.safetensors"), vec![7u8; 3_000_000]).unwrap();
    let tree = store.blobs.put_dir(&src).unwrap();
    assert_eq!(store.blobs.put_dir(&src).unwrap().id, tree.id);
    let out = dir.path().join("out");
    let t = store.blobs.materialize(&tree.id, &out).unwrap();
    assert_eq!(t.files.len(), 2);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        vec![7u8; 3_000_000]
    );
    let report = store.verify().unwrap();
    assert_eq!(report.blobs.blobs, 4);
}

#[test]
fn flipped_byte_is_detected_on_read_and_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let info = store.blobs.put_bytes(&data).unwrap();
    store.verify().unwrap();
    let path = store.blobs.path_of(&info.id).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[12_345] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let err = store.blobs.read(&info.id).unwrap_err();
    assert!(matches!(err, StoreError::BlobCorrupt { .. }), "{err}");
    assert!(err.to_string().contains(&info.id));
    let mut r = store.blobs.reader(&info.id).unwrap();
    let mut sink = Vec::new();
    assert!(r.read_to_end(&mut sink).is_err());
    let err = store.verify().unwrap_err();
    assert!(
        matches!(err, StoreError::BlobCorrupt { ref id, .. } if *id == info.id),
        "{err}"
    );
}

#[test]
fn bad_ids_and_missing_blobs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(matches!(
        store.blobs.read("../../etc/passwd"),
        Err(StoreError::BadBlobId(_))
    ));
    let missing = "0".repeat(64);
    assert!(matches!(
        store.blobs.read(&missing),
        Err(StoreError::BlobNotFound { .. })
    ));
    let not_tree = store.blobs.put_bytes(b"plain").unwrap();
    assert!(store
        .blobs
        .tree(&not_tree.id)
        .unwrap_err()
        .to_string()
        .contains("not a directory tree"));
}
