//! The exposed-types check (as tower and axum run `cargo check-external-types`): no type, trait
//! or re-export of a third-party crate in a library crate's public API unless the crate lists
//! that crate in its manifest:
//!
//! ```toml
//! [package.metadata.exposed-types]
//! # Why each is part of this crate's API.
//! allowed = ["serde", "url"]
//! ```
//!
//! The public API is read from rustdoc's JSON output (on the stable toolchain with
//! `RUSTC_BOOTSTRAP=1`, every feature on): from the crate root, every public item, re-export,
//! field, variant, method and trait implementation (synthetic and blanket implementations
//! aside), and every path in their signatures, generics and bounds. The standard library and the
//! workspace's own crates are always allowed. An allowed crate that the API no longer exposes
//! is an error too, so the lists stay true.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Crates every API may expose.
const ALWAYS: &[&str] = &["std", "core", "alloc"];

/// Where each exposed third-party crate shows, by crate name: a few item paths each.
pub(crate) type Exposures = BTreeMap<String, BTreeSet<String>>;

/// The third-party crates `doc` (one crate's rustdoc JSON) exposes, and where.
pub(crate) fn exposures(doc: &Value, workspace: &BTreeSet<String>) -> Result<Exposures, String> {
    let index = doc["index"].as_object().ok_or("rustdoc JSON: no index")?;
    let paths = doc["paths"].as_object().ok_or("rustdoc JSON: no paths")?;
    let externals = doc["external_crates"].as_object().ok_or("rustdoc JSON: no external_crates")?;
    let root = id_key(&doc["root"]).ok_or("rustdoc JSON: no root")?;
    let crate_of = |id: &str| -> Option<String> {
        let krate = paths.get(id)?["crate_id"].as_u64()?;
        if krate == 0 {
            return None;
        }
        let name = externals.get(&krate.to_string())?["name"].as_str()?;
        // serde's traits are defined in serde_core and re-exported by serde, the crate users
        // name.
        let name = if name == "serde_core" { "serde" } else { name };
        (!ALWAYS.contains(&name) && !workspace.contains(name)).then(|| name.to_owned())
    };
    let mut found = Exposures::new();
    let mut note = |krate: String, at: &str| {
        found.entry(krate).or_default().insert(at.to_owned());
    };
    let mut seen = BTreeSet::new();
    let mut stack = vec![(root, String::new())];
    while let Some((id, parent)) = stack.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(item) = index.get(&id) else {
            // An item of another crate (a re-export of it is judged where it is re-exported).
            continue;
        };
        let name =
            item["name"].as_str().or_else(|| item["inner"]["use"]["name"].as_str()).unwrap_or("_");
        let here = if parent.is_empty() { name.to_owned() } else { format!("{parent}::{name}") };
        let inner = &item["inner"];
        let mut push = |ids: &Value, at: &str| {
            for child in ids.as_array().into_iter().flatten().filter_map(id_key) {
                stack.push((child, at.to_owned()));
            }
        };
        let (kind, body) = match inner.as_object().and_then(|o| o.iter().next()) {
            Some((kind, body)) => (kind.as_str(), body),
            None => continue,
        };
        match kind {
            "module" => push(&body["items"], &here),
            "use" => {
                let Some(target) = id_key(&body["id"]) else { continue };
                if index.contains_key(&target) {
                    stack.push((target, parent.clone()));
                } else if let Some(krate) = crate_of(&target) {
                    note(krate, &format!("{here} (re-export)"));
                }
            }
            "struct" | "enum" | "union" => {
                paths_in(&body["generics"], &mut |p| {
                    if let Some(k) = crate_of(p) {
                        note(k, &here);
                    }
                });
                let kinds = &body["kind"];
                push(&kinds["plain"]["fields"], &here);
                push(&kinds["tuple"], &here);
                push(&body["fields"], &here);
                push(&body["variants"], &here);
                push(&body["impls"], &here);
            }
            "variant" => {
                push(&body["kind"]["tuple"], &here);
                push(&body["kind"]["struct"]["fields"], &here);
            }
            "impl" => {
                if body["is_synthetic"].as_bool() == Some(true) || !body["blanket_impl"].is_null() {
                    continue;
                }
                let at = match body["trait"]["path"].as_str() {
                    Some(t) => format!("{parent} (impl {t})"),
                    None => parent.clone(),
                };
                let mut record = |p: &str| {
                    if let Some(k) = crate_of(p) {
                        note(k, &at);
                    }
                };
                paths_in(&body["trait"], &mut record);
                paths_in(&body["generics"], &mut record);
                push(&body["items"], &parent);
            }
            "trait" => {
                paths_in(&body["generics"], &mut |p| {
                    if let Some(k) = crate_of(p) {
                        note(k, &here);
                    }
                });
                paths_in(&body["bounds"], &mut |p| {
                    if let Some(k) = crate_of(p) {
                        note(k, &here);
                    }
                });
                push(&body["items"], &here);
            }
            "macro" | "proc_macro" | "primitive" | "extern_crate" => {}
            // Functions, fields, aliases, constants, statics, associated items: every path in
            // their signature.
            _ => paths_in(body, &mut |p| {
                if let Some(k) = crate_of(p) {
                    note(k, &here);
                }
            }),
        }
    }
    Ok(found)
}

/// An item id as the index keys it.
fn id_key(v: &Value) -> Option<String> {
    v.as_u64().map(|n| n.to_string()).or_else(|| v.as_str().map(str::to_owned))
}

/// Every resolved path (`{"path": .., "id": ..}`) in `v`, by id.
fn paths_in(v: &Value, found: &mut dyn FnMut(&str)) {
    match v {
        Value::Object(map) => {
            if let (Some(_), Some(id)) = (map.get("path"), map.get("id").and_then(id_key)) {
                found(&id);
            }
            for child in map.values() {
                paths_in(child, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|c| paths_in(c, found)),
        _ => {}
    }
}

/// `allowed = [..]` under `[package.metadata.exposed-types]` in `manifest`.
pub(crate) fn allowed(manifest: &str) -> BTreeSet<String> {
    let mut inside = false;
    let mut out = BTreeSet::new();
    let mut in_list = false;
    for line in manifest.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') && !in_list {
            inside = line == "[package.metadata.exposed-types]";
            continue;
        }
        if !inside {
            continue;
        }
        let rest = if let Some(rest) = line.strip_prefix("allowed") {
            in_list = true;
            rest.trim_start().trim_start_matches('=').trim_start().trim_start_matches('[')
        } else if in_list {
            line
        } else {
            continue;
        };
        let (items, done) = match rest.find(']') {
            Some(end) => (&rest[..end], true),
            None => (rest, false),
        };
        out.extend(
            items
                .split(',')
                .map(|s| s.trim().trim_matches('"'))
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_")),
        );
        if done {
            in_list = false;
        }
    }
    out
}

/// What is wrong with `found` against `allowed`, for crate `krate`.
pub(crate) fn judge(krate: &str, found: &Exposures, allowed: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (dep, places) in found {
        if !allowed.contains(dep) {
            let shown: Vec<&str> = places.iter().take(4).map(String::as_str).collect();
            let more = if places.len() > 4 {
                format!(" and {} more", places.len() - 4)
            } else {
                "".into()
            };
            problems.push(format!(
                "{krate} exposes {dep} (not in [package.metadata.exposed-types] allowed): {}{more}",
                shown.join(", ")
            ));
        }
    }
    for dep in allowed {
        if !found.contains_key(dep) {
            problems.push(format!(
                "{krate} allows {dep} in [package.metadata.exposed-types], but its API no longer \
                 exposes it: remove it from the list"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        // A crate `demo` with `pub struct Req { pub url: url::Url, secret: .. }`, a public
        // function taking `tokio_util::sync::CancellationToken`, a re-export of
        // `rmcp::model::Tool`, and a private module using reqwest (not in the index).
        serde_json::json!({
            "root": 0,
            "index": {
                "0": {"name": "demo", "inner": {"module": {"items": [1, 3, 5]}}},
                "1": {"name": "Req", "inner": {"struct": {
                    "generics": {"params": [], "where_predicates": []},
                    "kind": {"plain": {"fields": [2], "has_stripped_fields": true}},
                    "impls": [6, 7]}}},
                "2": {"name": "url", "inner": {"struct_field": {"resolved_path": {"path": "url::Url", "id": 100, "args": null}}}},
                "3": {"name": "send", "inner": {"function": {"sig": {"inputs": [["c", {"resolved_path": {"path": "CancellationToken", "id": 101, "args": null}}]], "output": null}, "generics": {"params": [], "where_predicates": []}}}},
                "5": {"name": "Tool", "inner": {"use": {"source": "rmcp::model::Tool", "name": "Tool", "id": 102, "is_glob": false}}},
                "6": {"name": null, "inner": {"impl": {"is_synthetic": true, "blanket_impl": null, "trait": {"path": "Send", "id": 103, "args": null}, "generics": {}, "items": []}}},
                "7": {"name": null, "inner": {"impl": {"is_synthetic": false, "blanket_impl": null, "trait": {"path": "Serialize", "id": 104, "args": null}, "generics": {}, "items": []}}}
            },
            "paths": {
                "100": {"crate_id": 1, "path": ["url", "Url"]},
                "101": {"crate_id": 2, "path": ["tokio_util", "sync", "CancellationToken"]},
                "102": {"crate_id": 3, "path": ["rmcp", "model", "Tool"]},
                "103": {"crate_id": 4, "path": ["core", "marker", "Send"]},
                "104": {"crate_id": 5, "path": ["serde_core", "Serialize"]}
            },
            "external_crates": {
                "1": {"name": "url"}, "2": {"name": "tokio_util"}, "3": {"name": "rmcp"},
                "4": {"name": "core"}, "5": {"name": "serde_core"}
            }
        })
    }

    #[test]
    fn every_kind_of_exposure_is_found_and_judged() {
        let found = exposures(&doc(), &BTreeSet::new()).unwrap();
        let crates: Vec<&str> = found.keys().map(String::as_str).collect();
        assert_eq!(crates, ["rmcp", "serde", "tokio_util", "url"], "serde_core is named serde");
        assert!(found["url"].contains("demo::Req::url"), "{found:?}");
        assert!(found["tokio_util"].contains("demo::send"), "{found:?}");
        assert!(found["rmcp"].contains("demo::Tool (re-export)"), "{found:?}");
        assert!(found["serde"].iter().any(|p| p.contains("impl Serialize")), "{found:?}");

        let allowed: BTreeSet<String> = ["url", "serde", "rmcp", "axum"].map(str::to_owned).into();
        let problems = judge("demo", &found, &allowed);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("exposes tokio_util"), "{problems:?}");
        assert!(problems[1].contains("allows axum"), "{problems:?}");
        // The workspace's own crates are always allowed.
        let workspace: BTreeSet<String> = ["tokio_util"].map(str::to_owned).into();
        assert!(!exposures(&doc(), &workspace).unwrap().contains_key("tokio_util"));
    }

    #[test]
    fn the_allowed_list_is_read_from_the_manifest() {
        let manifest = "[package]\nname = \"x\"\n\n[package.metadata.exposed-types]\n\
                        # why\nallowed = [\n  \"serde\", # the derives\n  \"tokio-util\",\n]\n\n\
                        [dependencies]\nallowed = [\"not-this\"]\n";
        let list: Vec<String> = allowed(manifest).into_iter().collect();
        assert_eq!(list, ["serde", "tokio_util"]);
        assert!(allowed("[package]\nname = \"x\"\n").is_empty());
    }
}
