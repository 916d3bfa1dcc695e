//! Reading a config file: TOML into keys and values that remember their
//! line, so that every complaint about the file can point at it. What the
//! keys mean is [`super::load`]'s business.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{Document, Item, TableLike, Value as Toml};

/// Largest config file read. A real one is a few kilobytes; the cap turns
/// a wrong path (a log file, `/dev/zero`) into an error instead of a hang.
const MAX_FILE: u64 = 1024 * 1024;

/// A config file as read: its top-level settings, in file order.
#[derive(Debug)]
pub(crate) struct ConfigFile {
    pub path: PathBuf,          // as the user gave it, for messages
    pub settings: Vec<Setting>, // top-level keys, by line
}

/// One `key = value` (or `[[key]]` tables).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Setting {
    pub key: String, // as written
    pub line: usize, // of the key, from 1
    pub value: Value,
}

/// A setting's value, in the shapes a config file may use.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// One value: `key = 1`.
    One(Scalar),
    /// An array of values: `key = [1, 2]`.
    List(Vec<Scalar>),
    /// Tables: `[[key]]` sections, or an array of inline tables.
    Tables(Vec<Table>),
}

/// A table of settings (one `[[service]]`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Table {
    pub line: usize,            // of its header (or opening brace)
    pub settings: Vec<Setting>, // its keys, by line
}

/// One plain value and its line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scalar {
    pub line: usize,
    pub kind: Kind,
}

/// The TOML types a setting may take; the others are kept by name, for
/// the message that refuses them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Str(String),
    Int(i64),
    Bool(bool),
    Other(&'static str), // a float, a date, an array inside an array, a table
}

impl Kind {
    /// What the file holds, for messages: `a string`, `an integer`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Kind::Str(_) => "a string".into(),
            Kind::Int(_) => "an integer".into(),
            Kind::Bool(_) => "a boolean".into(),
            Kind::Other(name) => format!("{} {name}", article(name)),
        }
    }
}

fn article(noun: &str) -> &'static str {
    match noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        true => "an",
        false => "a",
    }
}

/// `FILE:LINE: message`, the form of every complaint about a file.
pub(crate) fn at(path: &Path, line: usize, message: impl std::fmt::Display) -> String {
    format!("{}:{line}: {message}", path.display())
}

/// Reads and parses the file at `path`.
pub(crate) fn read(path: &Path) -> Result<ConfigFile, String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut text = String::new();
    file.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!("{shown}: larger than {MAX_FILE} bytes"));
    }
    parse(path, &text)
}

/// Parses `text`, the contents of `path`. A syntax error (a duplicate key
/// among them) is one line with the line and column where it was found.
pub(crate) fn parse(path: &Path, text: &str) -> Result<ConfigFile, String> {
    let document = Document::parse(text).map_err(|e| {
        let span = e.span().unwrap_or_default();
        let (line, column) = position(text, span.start);
        // toml_edit's message may run over lines ("invalid key\nexpected ...").
        let mut message = e.message().trim().replace('\n', "; ");
        // It says "duplicate key" and points at the key: name it.
        if message.starts_with("duplicate key") {
            let key = text.get(span).unwrap_or_default().trim();
            message = format!("{message} {key}");
        }
        format!("{}:{line}:{column}: {message}", path.display())
    })?;
    Ok(ConfigFile {
        path: path.to_owned(),
        settings: settings(document.as_table(), text),
    })
}

/// A table's settings, sorted by line.
fn settings(table: &dyn TableLike, text: &str) -> Vec<Setting> {
    let mut settings: Vec<Setting> = table
        .iter()
        .filter_map(|(key, item)| {
            let (key, _) = table.get_key_value(key)?;
            let line = line_of(text, key.span());
            Some(Setting {
                key: key.get().to_owned(),
                line,
                value: value(item, line, text),
            })
        })
        .collect();
    settings.sort_by_key(|setting| setting.line);
    settings
}

/// The value of an item whose key is on `line`.
fn value(item: &Item, line: usize, text: &str) -> Value {
    match item {
        Item::Value(Toml::Array(array)) => {
            let tables: Option<Vec<Table>> = array
                .iter()
                .map(|v| v.as_inline_table().map(|t| table(t, v.span(), text)))
                .collect();
            match tables {
                Some(tables) if !tables.is_empty() => Value::Tables(tables),
                _ => Value::List(array.iter().map(|v| scalar(v, text)).collect()),
            }
        }
        Item::Value(v) => Value::One(scalar(v, text)),
        Item::ArrayOfTables(array) => {
            Value::Tables(array.iter().map(|t| table(t, t.span(), text)).collect())
        }
        Item::Table(_) | Item::None => Value::One(Scalar {
            line,
            kind: Kind::Other("table"),
        }),
    }
}

fn table(table: &dyn TableLike, span: Option<Range<usize>>, text: &str) -> Table {
    Table {
        line: line_of(text, span),
        settings: settings(table, text),
    }
}

fn scalar(value: &Toml, text: &str) -> Scalar {
    let kind = match value {
        Toml::String(s) => Kind::Str(s.value().clone()),
        Toml::Integer(i) => Kind::Int(*i.value()),
        Toml::Boolean(b) => Kind::Bool(*b.value()),
        Toml::Float(_) => Kind::Other("float"),
        Toml::Datetime(_) => Kind::Other("date"),
        Toml::Array(_) => Kind::Other("array"),
        Toml::InlineTable(_) => Kind::Other("table"),
    };
    Scalar {
        line: line_of(text, value.span()),
        kind,
    }
}

/// The line (from 1) a span starts on; 1 if the parser kept no span.
fn line_of(text: &str, span: Option<Range<usize>>) -> usize {
    position(text, span.map_or(0, |span| span.start)).0
}

/// Line and column (both from 1, the column in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<Setting> {
        parse(Path::new("t.toml"), text).expect("parses").settings
    }

    fn scalar(line: usize, kind: Kind) -> Scalar {
        Scalar { line, kind }
    }

    #[test]
    fn values_keep_their_lines_and_types() {
        let text = "# a comment\nreg_port = 9000\nbind = \"::\"\n\nno_splice = true\n\
                    relays = [\n  \"a:1\",\n  \"b:2\",\n]\ngrace = 1.5\n";
        let settings = parsed(text);
        let got: Vec<_> = settings.iter().map(|s| (s.key.as_str(), s.line)).collect();
        assert_eq!(
            got,
            [
                ("reg_port", 2),
                ("bind", 3),
                ("no_splice", 5),
                ("relays", 6),
                ("grace", 10)
            ]
        );
        assert_eq!(settings[0].value, Value::One(scalar(2, Kind::Int(9000))));
        assert_eq!(
            settings[1].value,
            Value::One(scalar(3, Kind::Str("::".into())))
        );
        assert_eq!(settings[2].value, Value::One(scalar(5, Kind::Bool(true))));
        assert_eq!(
            settings[3].value,
            Value::List(vec![
                scalar(7, Kind::Str("a:1".into())),
                scalar(8, Kind::Str("b:2".into()))
            ])
        );
        assert_eq!(
            settings[4].value,
            Value::One(scalar(10, Kind::Other("float")))
        );
    }

    #[test]
    fn service_tables_keep_their_lines() {
        let text = "relay = \"r:1\"\n\n[[service]]\nname = \"web\"\nlocal = \"l:2\"\n\n\
                    [[service]]\nlocal = \"l:3\"\n";
        let settings = parsed(text);
        let Value::Tables(tables) = &settings[1].value else {
            panic!("tables expected: {settings:?}");
        };
        assert_eq!(settings[1].key, "service");
        assert_eq!(tables.len(), 2);
        assert_eq!((tables[0].line, tables[1].line), (3, 7));
        let keys: Vec<_> = tables[0]
            .settings
            .iter()
            .map(|s| (s.key.as_str(), s.line))
            .collect();
        assert_eq!(keys, [("name", 4), ("local", 5)]);
        assert_eq!(tables[1].settings[0].line, 8);
    }

    #[test]
    fn inline_tables_are_tables_too() {
        let settings =
            parsed("service = [\n  { local = \"l:1\" },\n  { local = \"l:2\", ready = 2 },\n]\n");
        let Value::Tables(tables) = &settings[0].value else {
            panic!("tables expected: {settings:?}");
        };
        assert_eq!((tables[0].line, tables[1].line), (2, 3));
        assert_eq!(
            tables[1].settings[1].value,
            Value::One(scalar(3, Kind::Int(2)))
        );
    }

    #[test]
    fn a_plain_table_is_kept_as_a_wrong_type() {
        let settings = parsed("[service]\nlocal = \"l:1\"\n");
        assert_eq!(
            settings[0].value,
            Value::One(scalar(1, Kind::Other("table")))
        );
    }

    #[test]
    fn syntax_errors_are_one_line_with_line_and_column() {
        for (text, place) in [
            ("reg_port = 1\nbind = \n", "t.toml:2:"),
            (
                "grace = \"1s\"\ngrace = \"2s\"\n",
                "t.toml:2:1: duplicate key grace",
            ),
            ("a = [1,\n", "t.toml:"),
            ("x = \"unterminated\n", "t.toml:1:"),
        ] {
            let error = parse(Path::new("t.toml"), text).expect_err(text);
            assert!(error.starts_with(place), "{text:?}: {error}");
            assert!(!error.contains('\n'), "{text:?}: {error}");
        }
    }

    #[test]
    fn positions_count_from_one_in_characters() {
        assert_eq!(position("ab\ncé\nx", 0), (1, 1));
        assert_eq!(position("ab\ncé\nx", 3), (2, 1));
        assert_eq!(position("ab\ncé\nx", 6), (2, 3));
        assert_eq!(position("ab\ncé\nx", 7), (3, 1));
    }

    #[test]
    fn types_are_described_with_an_article() {
        assert_eq!(Kind::Int(1).describe(), "an integer");
        assert_eq!(Kind::Other("array").describe(), "an array");
        assert_eq!(Kind::Other("float").describe(), "a float");
    }
}
