//! Repository invariants from ARCHITECTURE.md, checked as ordinary tests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).expect("read dir").flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() {
                if name != "target" && name != ".git" {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

/// `cargo tree` of a package's normal and build dependencies, one package a line.
fn cargo_tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts that `package` links `expected` (so the listing is sane) and none of `forbidden`.
fn assert_links_none_of(package: &str, expected: &str, forbidden: &[&str]) {
    let tree = cargo_tree(package);
    assert!(
        tree.lines().any(|line| line.starts_with(expected)),
        "cargo tree output looks wrong:\n{tree}"
    );
    for name in forbidden {
        assert!(
            !tree.lines().any(|line| line.starts_with(name)),
            "{package} depends on {name}"
        );
    }
}

/// The relay never decrypts: it must not link the end-to-end crypto core or the SDK.
#[test]
fn relay_links_neither_the_crypto_core_nor_the_sdk() {
    assert_links_none_of(
        "haven-server",
        "haven-store",
        &[
            "haven-protocol",
            "haven-sdk",
            "haven-ffi",
            "x25519-dalek",
            "ml-kem",
        ],
    );
}

/// The protocol core does no IO: no runtime, no network, no storage, and no OS
/// randomness pulled in by default (randomness is an argument).
#[test]
fn protocol_core_links_no_io() {
    assert_links_none_of(
        "haven-protocol",
        "ml-kem",
        &[
            "tokio",
            "tonic",
            "sled",
            "getrandom",
            "mio",
            "haven-store",
            "haven-proto ",
        ],
    );
}

/// Generated types stop at the edge: in the relay only `server/src/grpc` names them.
#[test]
fn generated_types_stay_in_the_grpc_edge() {
    let server = workspace_root().join("server/src");
    for file in rust_files(&server) {
        let relative = file.strip_prefix(&server).expect("inside server/src");
        if relative.starts_with("grpc") || relative == Path::new("grpc.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        assert!(
            !text.contains("haven_proto::v1"),
            "{} names generated types",
            file.display()
        );
    }
}

/// No ignored tests and no `should_panic`: a test runs, and it asserts an `Err`.
#[test]
fn no_ignored_or_should_panic_tests() {
    let ignore = ["#[", "ignore]"].concat();
    let should_panic = ["#[", "should_panic"].concat();
    for file in rust_files(&workspace_root()) {
        let text = std::fs::read_to_string(&file).expect("read source");
        assert!(
            !text.contains(&ignore),
            "{} has an ignored test",
            file.display()
        );
        assert!(
            !text.contains(&should_panic),
            "{} uses should_panic",
            file.display()
        );
    }
}

/// Every Rust file opens with a one-line `//!` saying what it is.
#[test]
fn every_source_file_opens_with_a_module_comment() {
    for file in rust_files(&workspace_root()) {
        let text = std::fs::read_to_string(&file).expect("read source");
        assert!(
            text.starts_with("//!"),
            "{} does not open with a //! line",
            file.display()
        );
    }
}
