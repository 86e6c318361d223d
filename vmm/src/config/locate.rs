//! Maps a byte offset in a TOML document to the dotted path of the field there.
//!
//! serde errors (wrong type, unknown field, missing field) carry a span but not the
//! path of the field; this module re-reads the document as a generic tree of spanned
//! keys and values and finds the innermost key or value that contains the offset.

use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// A generic TOML value that remembers the spans of its keys and elements.
enum Node {
    Table(Vec<(Spanned<String>, Spanned<Node>)>),
    Array(Vec<Spanned<Node>>),
    Leaf,
}

/// Every key and value in a document with its span and path.
pub(crate) struct FieldIndex {
    entries: Vec<(Range<usize>, String)>,
}

impl FieldIndex {
    /// Indexes `text`. Documents that do not parse give an empty index (paths are then
    /// simply left out of messages).
    pub fn new(text: &str) -> FieldIndex {
        let mut entries = Vec::new();
        if let Ok(Node::Table(items)) = toml::from_str::<Node>(text) {
            collect_table(&items, "", &mut entries);
        }
        FieldIndex { entries }
    }

    /// The path of the innermost key or value containing `offset` (`""` if none).
    pub fn path_at(&self, offset: usize) -> &str {
        self.entries
            .iter()
            .filter(|(span, _)| span.start <= offset && offset < span.end.max(span.start + 1))
            .min_by_key(|(span, path)| (span.end - span.start, std::cmp::Reverse(path.len())))
            .map(|(_, path)| path.as_str())
            .unwrap_or("")
    }
}

impl FieldIndex {
    /// The path of the value (usually a table) spanning exactly `span` (`""` if none,
    /// e.g. for the document's root table).
    pub fn path_of_span(&self, span: &Range<usize>) -> &str {
        self.entries
            .iter()
            .rev()
            .find(|(s, _)| s == span)
            .map(|(_, path)| path.as_str())
            .unwrap_or("")
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn collect_table(
    items: &[(Spanned<String>, Spanned<Node>)],
    prefix: &str,
    out: &mut Vec<(Range<usize>, String)>,
) {
    for (key, value) in items {
        let path = join(prefix, key.get_ref());
        out.push((key.span(), path.clone()));
        collect_value(value, &path, out);
    }
}

fn collect_value(value: &Spanned<Node>, path: &str, out: &mut Vec<(Range<usize>, String)>) {
    out.push((value.span(), path.to_string()));
    match value.get_ref() {
        Node::Table(items) => collect_table(items, path, out),
        Node::Array(elements) => {
            for (i, element) in elements.iter().enumerate() {
                collect_value(element, &format!("{path}[{i}]"), out);
            }
        }
        Node::Leaf => {}
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element::<Spanned<Node>>()? {
            elements.push(element);
        }
        Ok(Node::Array(elements))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<Spanned<Node>>()?;
            items.push((key, value));
        }
        Ok(Node::Table(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of(text: &str, needle: &str) -> String {
        let offset = text.find(needle).unwrap_or(usize::MAX);
        FieldIndex::new(text).path_at(offset).to_string()
    }

    #[test]
    fn finds_paths() {
        let text = "name = \"x\"\n[vcpus]\ncount = \"two\"\naffinity = [[0], [1, 77]]\n\
                    [[net]]\nid = \"a\"\n[[net]]\nid = \"b\"\nmac = \"zz\"\n";
        assert_eq!(path_of(text, "\"x\""), "name");
        assert_eq!(path_of(text, "\"two\""), "vcpus.count");
        assert_eq!(path_of(text, "count"), "vcpus.count");
        assert_eq!(path_of(text, "77"), "vcpus.affinity[1][1]");
        assert_eq!(path_of(text, "\"b\""), "net[1].id");
        assert_eq!(path_of(text, "\"zz\""), "net[1].mac");
    }

    #[test]
    fn bad_documents_give_no_path() {
        let index = FieldIndex::new("name = \n");
        assert_eq!(index.path_at(3), "");
    }
}
