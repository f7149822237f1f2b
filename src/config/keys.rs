//! Unknown keys, all of them: a pass over the parsed TOML tree, before serde sees it, that reports
//! every key the schema does not know and removes it, so that deserialization and the semantic
//! checks still run and `gatehouse check` lists every problem in one go.
//!
//! Neighbours: `mod.rs` runs this between parsing and deserializing. The allowed keys of each
//! table come from the serde structs in `file.rs` themselves (see `fields_of`), so they cannot
//! drift; only which struct describes which table is written out here, in `ROOT`, and a unit test
//! checks that every table `examples/full.toml` uses is described. A table missing from `ROOT` is
//! not scanned, and its unknown keys fall back to serde's `deny_unknown_fields`, one at a time.

use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use toml::de::{DeTable, DeValue};

use super::error::Problem;
use super::file::{
    AdminSection, ClientAuthSection, FileConfig, GlobalTimeouts, HealthCheckSection, Http2Section,
    LimitsSection, ListenerSection, LogSection, OutlierSection, ReloadSection, ResolverSection,
    RespondSection, RetrySection, RouteSection, RouteTimeoutsSection, ServerTable, TlsCertSection,
    UpstreamSection, UpstreamTimeoutsSection, UpstreamTlsSection,
};

/// The shape of one value in the file, as far as key checking needs it.
#[derive(Clone, Copy)]
pub(crate) enum Node {
    /// A table with a fixed set of keys (one serde struct); `children` describes the values of
    /// the keys that hold tables or arrays of tables.
    Struct {
        fields: fn() -> &'static [&'static str],
        children: &'static [(&'static str, Node)],
    },
    /// A table whose keys are names the user chooses (`[upstream.NAME]`), each value a `Node`.
    Map(&'static Node),
    /// An array whose table elements are each a `Node` (other elements are left to serde).
    Array(&'static Node),
    /// One table that is a `Node`, or an array of them (`tls = {...}` or `tls = [{...}]`).
    OneOrMany(&'static Node),
}

const NO_CHILDREN: &[(&str, Node)] = &[];

/// The whole file.
pub(crate) static ROOT: Node = Node::Struct {
    fields: fields_of::<FileConfig>,
    children: &[
        ("log", leaf(fields_of::<LogSection>)),
        ("admin", leaf(fields_of::<AdminSection>)),
        ("timeouts", leaf(fields_of::<GlobalTimeouts>)),
        ("limits", leaf(fields_of::<LimitsSection>)),
        ("resolver", leaf(fields_of::<ResolverSection>)),
        ("reload", leaf(fields_of::<ReloadSection>)),
        ("http2", leaf(fields_of::<Http2Section>)),
        (
            "listener",
            Node::Array(&Node::Struct {
                fields: fields_of::<ListenerSection>,
                children: &[
                    ("tls", Node::OneOrMany(&leaf(fields_of::<TlsCertSection>))),
                    ("client_auth", leaf(fields_of::<ClientAuthSection>)),
                ],
            }),
        ),
        (
            "upstream",
            Node::Map(&Node::Struct {
                fields: fields_of::<UpstreamSection>,
                children: &[
                    ("servers", Node::Array(&leaf(fields_of::<ServerTable>))),
                    ("timeouts", leaf(fields_of::<UpstreamTimeoutsSection>)),
                    ("health_check", leaf(fields_of::<HealthCheckSection>)),
                    ("outlier", leaf(fields_of::<OutlierSection>)),
                    ("retry", leaf(fields_of::<RetrySection>)),
                    ("tls", leaf(fields_of::<UpstreamTlsSection>)),
                ],
            }),
        ),
        (
            "route",
            Node::Array(&Node::Struct {
                fields: fields_of::<RouteSection>,
                children: &[
                    ("respond", leaf(fields_of::<RespondSection>)),
                    ("timeouts", leaf(fields_of::<RouteTimeoutsSection>)),
                ],
            }),
        ),
    ],
};

/// A table with no nested tables.
const fn leaf(fields: fn() -> &'static [&'static str]) -> Node {
    Node::Struct {
        fields,
        children: NO_CHILDREN,
    }
}

/// Reports every key of `root` that `ROOT` does not allow, at the key, with serde's own message,
/// and removes it from the tree.
pub(crate) fn remove_unknown(root: &mut DeTable<'_>) -> Vec<Problem> {
    let mut problems = Vec::new();
    visit_table(&ROOT, root, &mut problems);
    problems
}

fn visit(node: &Node, value: &mut DeValue<'_>, problems: &mut Vec<Problem>) {
    match (node, value) {
        (Node::Struct { .. }, DeValue::Table(table)) => visit_table(node, table, problems),
        (Node::Map(each), DeValue::Table(table)) => {
            for (_, v) in table.iter_mut() {
                visit(each, v.get_mut(), problems);
            }
        }
        (Node::Array(each) | Node::OneOrMany(each), DeValue::Array(array)) => {
            for v in array.iter_mut() {
                visit(each, v.get_mut(), problems);
            }
        }
        (Node::OneOrMany(each), DeValue::Table(table)) => visit_table(each, table, problems),
        // A value of the wrong type: serde reports it.
        _ => {}
    }
}

fn visit_table(node: &Node, table: &mut DeTable<'_>, problems: &mut Vec<Problem>) {
    let Node::Struct { fields, children } = node else {
        return;
    };
    let fields = fields();
    let unknown: Vec<(String, Range<usize>)> = table
        .keys()
        .filter(|k| !fields.contains(&k.get_ref().as_ref()))
        .map(|k| (k.get_ref().to_string(), k.span()))
        .collect();
    for (key, span) in unknown {
        table.remove(key.as_str());
        problems.push(Problem {
            span,
            message: <de::value::Error as de::Error>::unknown_field(&key, fields).to_string(),
        });
    }
    for (key, value) in table.iter_mut() {
        if let Some((_, child)) = children.iter().find(|(name, _)| *name == key.get_ref()) {
            visit(child, value.get_mut(), problems);
        }
    }
}

/// The keys serde's derived `Deserialize` for `T` accepts: the list it passes to
/// `deserialize_struct`, caught by a deserializer that stops there. Empty for a type that does not
/// deserialize as a struct.
pub(crate) fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Catch(Option<&'static [&'static str]>);
    impl<'de> Deserializer<'de> for &mut Catch {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            Err(de::Error::custom("fields caught"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut catch = Catch(None);
    let _ = T::deserialize(&mut catch);
    catch.0.unwrap_or(&[])
}
