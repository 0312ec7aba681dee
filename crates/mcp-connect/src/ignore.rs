//! `--ignore-tool PATTERN`: tools hidden from the host and refused if it calls them anyway.
//!
//! A pattern is a tool name with `*` standing for any run of characters, compared without regard
//! to case (`delete*` hides `delete_file` and `Delete_All`). The proxy removes hidden tools from
//! every `tools/list` result and answers a `tools/call` of one with a JSON-RPC error, without
//! sending it to the server; `tools` does not list them and `call` refuses them.

use std::collections::HashSet;
use std::sync::Mutex;

/// The tools to hide, and the `tools/list` requests whose answers must be filtered.
#[derive(Debug, Default)]
pub(crate) struct ToolFilter {
    patterns: Vec<String>,
    /// Ids (as JSON text) of the host's `tools/list` requests still waiting for an answer.
    listing: Mutex<HashSet<String>>,
}

impl ToolFilter {
    pub(crate) fn new(patterns: Vec<String>) -> Self {
        ToolFilter {
            patterns: patterns.into_iter().map(|p| p.to_lowercase()).collect(),
            listing: Mutex::new(HashSet::new()),
        }
    }

    /// Whether any tool is hidden at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `tool` is hidden.
    pub(crate) fn hides(&self, tool: &str) -> bool {
        let tool = tool.to_lowercase();
        self.patterns.iter().any(|p| glob(p, &tool))
    }

    /// Look at a message from the host: `Some(tool)` when it calls a hidden tool (it must not be
    /// sent); a `tools/list` request is remembered so that its answer is filtered.
    pub(crate) fn inspect_host_message(&self, message: &serde_json::Value) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        match message.get("method").and_then(serde_json::Value::as_str) {
            Some("tools/call") => {
                let name = message.pointer("/params/name").and_then(serde_json::Value::as_str)?;
                self.hides(name).then(|| name.to_owned())
            }
            Some("tools/list") => {
                if let Some(id) = message.get("id") {
                    self.lock().insert(id.to_string());
                }
                None
            }
            _ => None,
        }
    }

    /// Filter a message from the server: the answer to a remembered `tools/list` loses its
    /// hidden tools. Whether the message was changed.
    pub(crate) fn filter_server_message(&self, message: &mut serde_json::Value) -> bool {
        if self.is_empty() {
            return false;
        }
        let Some(id) = message.get("id").map(ToString::to_string) else { return false };
        if !self.lock().remove(&id) {
            return false;
        }
        let Some(tools) = message.pointer_mut("/result/tools").and_then(|t| t.as_array_mut())
        else {
            return false;
        };
        let before = tools.len();
        tools.retain(|tool| {
            !tool.get("name").and_then(serde_json::Value::as_str).is_some_and(|n| self.hides(n))
        });
        tools.len() != before
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.listing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `*`-only glob match of `text` against `pattern` (both lower-cased by the caller).
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patterns_match_whole_names_with_stars_and_any_case() {
        let filter = ToolFilter::new(vec!["delete*".into(), "*admin*".into(), "exact".into()]);
        for hidden in ["delete", "delete_file", "Delete_All", "super_admin_x", "ADMIN", "exact"] {
            assert!(filter.hides(hidden), "{hidden}");
        }
        for shown in ["undelete", "echo", "exactly", "adm_in"] {
            assert!(!filter.hides(shown), "{shown}");
        }
        assert!(glob("a*b*c", "axxbyyc") && !glob("a*b*c", "axxcyyb") && glob("*", ""));
        assert!(!glob("ab*ba", "aba"), "the prefix and suffix may not overlap");
    }

    #[test]
    fn a_list_answer_loses_hidden_tools_and_a_call_of_one_is_caught() {
        let filter = ToolFilter::new(vec!["delete*".into()]);
        let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "delete_all"}});
        assert_eq!(filter.inspect_host_message(&call).as_deref(), Some("delete_all"));
        let ok =
            json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "echo"}});
        assert_eq!(filter.inspect_host_message(&ok), None);

        let list = json!({"jsonrpc": "2.0", "id": "l1", "method": "tools/list"});
        assert_eq!(filter.inspect_host_message(&list), None);
        let answer = || json!({"jsonrpc": "2.0", "id": "l1", "result": {"tools": [{"name": "echo"}, {"name": "delete_all"}]}});
        // Another request's answer with the same shape is left alone.
        let mut other =
            json!({"jsonrpc": "2.0", "id": "x", "result": {"tools": [{"name": "delete_all"}]}});
        assert!(!filter.filter_server_message(&mut other));
        let mut filtered = answer();
        assert!(filter.filter_server_message(&mut filtered));
        assert_eq!(filtered["result"]["tools"], json!([{"name": "echo"}]));
        // Filtered once: the id is forgotten.
        assert!(!filter.filter_server_message(&mut answer()));
    }
}
