//! The module map in `src/lib.rs` is true: each module of the server uses only modules of the
//! layers above its own, as the map lists them, and every module is on the map. A module that
//! starts using one of its own layer or below fails here: move the shared part down a layer,
//! or move the module, and say so on the map.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The layer of each module, read from the numbered lines of `src/lib.rs`'s map.
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let mut layers = BTreeMap::new();
    let mut layer = None;
    for line in lib.lines().map_while(|l| l.strip_prefix("//!")) {
        let line = line.trim_start();
        if let Some((number, _)) = line.split_once(". ")
            && let Ok(n) = number.parse::<usize>()
        {
            layer = Some(n);
        }
        if line.starts_with("Every layer uses") {
            break;
        }
        let Some(n) = layer else { continue };
        for link in line.split("[`").skip(1) {
            let name = link.split('`').next().unwrap();
            if !name.contains("::") {
                layers.insert(name.to_owned(), n);
            }
        }
    }
    layers
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// The top-level modules a file names as `crate::module` (comments left out).
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap();
                found.extend(group.split(',').map(|g| g.trim().split("::").next().unwrap().to_owned()));
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                found.insert(name);
            }
        }
    }
    found.retain(|name| !name.is_empty() && name != "self");
    found
}

#[test]
fn the_module_map_is_true() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let layers = layers(&lib);
    assert!(layers.len() >= 10, "the map in src/lib.rs lists its modules by layer: {layers:?}");

    // Every module the library declares is on the map (but the contract, `pb`, under all).
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_owned())
        .collect();
    let mapped: BTreeSet<String> = layers.keys().filter(|m| *m != "pb").cloned().collect();
    assert_eq!(declared, mapped, "modules declared in src/lib.rs, and modules on its map");

    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs");
        let Some(&layer) = layers.get(module) else { continue }; // lib.rs, main.rs, bin/
        for used in uses(&fs::read_to_string(&file).unwrap()) {
            match layers.get(&used) {
                Some(&below) if below >= layer && used != module => {
                    wrong.push(format!("{} (layer {layer}) uses {used} (layer {below})", relative.display()))
                }
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "uses against the map in src/lib.rs:\n{}", wrong.join("\n"));
}

/// The map's reader and the use finder themselves.
#[test]
fn the_map_reader_finds_layers_and_uses() {
    let lib = "//! Map:\n//! 1. [`a`]: x. [`b`]:\n//!    y [`a::f`].\n//! 2. [`c`]: z.\n//!\n//! Every layer uses [`pb`].\n";
    let layers = layers(lib);
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), [("a".into(), 1), ("b".into(), 1), ("c".into(), 2)]);
    let text = "use crate::{a, b::C};\nlet x = crate::c::f(); // crate::d\n";
    assert_eq!(uses(text).into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
}

/// A file over 500 lines says at its top why it is not split (a line "Over 500 lines: ...").
#[test]
fn long_files_say_why_they_are_long() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "sdk/src", "proto/src", "tests", "benches"] {
        sources(&root.join(dir), &mut files);
    }
    let unexplained: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let text = fs::read_to_string(file).unwrap();
            let long = text.lines().count() > 500;
            let said = text.lines().take(40).any(|l| l.contains("Over 500 lines: "));
            (long && !said).then(|| file.strip_prefix(root).unwrap().display().to_string())
        })
        .collect();
    assert!(unexplained.is_empty(), "over 500 lines, with no reason at the top: {unexplained:?}");
}
