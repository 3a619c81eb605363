//! The agent's plugin archive (tar / tar.gz) extractor never panics, and
//! whatever it accepts or refuses, it writes nothing outside the staging
//! directory and creates nothing but regular files and directories there.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

/// Every path under `dir` is a regular file or a directory (no symlink,
/// FIFO or device), and lies under `dir`.
fn check_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("read staging dir") {
        let e = e.expect("dir entry");
        let t = e.file_type().expect("file type");
        assert!(t.is_file() || t.is_dir(), "{:?} is {t:?}", e.path());
        assert!(e.path().starts_with(dir));
        if t.is_dir() {
            check_tree(&e.path());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, archive)) = data.split_first() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("stage");
    std::fs::create_dir(&dest).expect("stage dir");
    let _ = elkeid_agent::fuzzing::extract_plugin_archive(archive, mode & 1 == 1, &dest);
    check_tree(&dest);
    // Nothing escaped next to the staging directory.
    let siblings: Vec<_> = std::fs::read_dir(root.path())
        .expect("read root")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(siblings, vec![std::ffi::OsString::from("stage")]);
});
