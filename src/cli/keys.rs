//! A config file's keys as flags: which flag each key names, the TOML type
//! it takes, and the command-line arguments (`--flag=VALUE`) its value
//! becomes, so that clap converts a file's value exactly as it converts the
//! flag's.

use std::any::TypeId;
use std::ffi::OsString;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction};
use tcp_relay::AllowList;

use super::file::{Kind, Scalar, Setting, Value, at};

/// Flags a file cannot set: the file itself, what to do with it, and
/// -v/-q, which `log_level` says in words.
const NOT_KEYS: [&str; 6] = [
    "config",
    "print_config",
    "help",
    "version",
    "verbose",
    "quiet",
];

/// The file's plural of `relay`, for a list of relays.
pub(crate) const RELAYS: &str = "relays";

/// The `expose` key whose tables are the services.
pub(crate) const SERVICE: &str = "service";

/// Keys that are one setting: given on the command line, any of them hides
/// all of them in the file; a file may hold only one of them.
const ONE_SETTING: [&[&str]; 4] = [
    &["secret", "secret_file"],
    &["log_level", "verbose", "quiet"],
    &["local", SERVICE],
    &["relay", RELAYS],
];

/// The keys that are one setting with `key` (`key` among them).
pub(crate) fn one_setting(key: &str) -> Vec<&str> {
    ONE_SETTING
        .iter()
        .find(|group| group.contains(&key))
        .map_or_else(|| vec![key], |group| group.to_vec())
}

/// The key a flag goes by in a file: its long name, `_` for `-`.
pub(crate) fn key_of(arg: &Arg) -> Option<String> {
    arg.get_long().map(|long| long.replace('-', "_"))
}

/// The flag `key` names among `args` (`relays` names `--relay`), whether
/// or not a file may set it.
pub(crate) fn flag<'a>(args: &[&'a Arg], key: &str) -> Option<&'a Arg> {
    let key = if key == RELAYS { "relay" } else { key };
    args.iter()
        .copied()
        .find(|arg| key_of(arg).as_deref() == Some(key))
}

/// Every key a file may hold for a command with these flags.
pub(crate) fn known_keys(args: &[&Arg], services: bool) -> Vec<String> {
    let mut keys: Vec<String> = args
        .iter()
        .filter_map(|arg| key_of(arg))
        .filter(|key| !NOT_KEYS.contains(&key.as_str()))
        .collect();
    if keys.iter().any(|key| key == "relay") {
        keys.push(RELAYS.into());
    }
    if services {
        keys.push(SERVICE.into());
    }
    keys
}

/// The complaint about a key that is not in `known`: the closest known key
/// if there is one near enough to be a typo.
pub(crate) fn unknown_key(key: &str, known: &[String]) -> String {
    if NOT_KEYS.contains(&key) {
        let hint = if matches!(key, "verbose" | "quiet") {
            " (use log_level)"
        } else {
            ""
        };
        return format!("{key:?} cannot be set in a config file{hint}");
    }
    let typed = key.replace('-', "_");
    let closest = known
        .iter()
        .map(|candidate| (distance(&typed, candidate), candidate))
        .min();
    match closest {
        // Two edits catch a transposition (reg_prot) or a missing letter
        // or two, without proposing unrelated short keys.
        Some((d, candidate)) if d <= 2 => {
            format!("unknown key {key:?} (did you mean {candidate:?}?)")
        }
        _ => format!("unknown key {key:?}"),
    }
}

/// Levenshtein distance: the fewest insertions, deletions and substitutions
/// that turn `a` into `b`.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// One command-line argument made from a file's value, and where it was.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub text: OsString, // --flag or --flag=VALUE
    pub key: String,    // the key, as written
    pub line: usize,    // the value's line
}

/// The TOML type a flag takes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Switch,  // a flag without a value: true or false
    Integer, // a number
    Text,    // everything else, as typed on the command line
}

fn shape(arg: &Arg) -> Shape {
    let parsed = arg.get_value_parser().type_id();
    let integers = [
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<NonZeroU32>(),
    ];
    match arg.get_action() {
        ArgAction::SetTrue => Shape::Switch,
        _ if integers.iter().any(|id| parsed == *id) => Shape::Integer,
        _ => Shape::Text,
    }
}

/// Whether the flag is given more than once for several values.
fn repeats(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// Whether the flag takes a comma-separated list in one value.
fn comma_list(arg: &Arg) -> bool {
    arg.get_value_parser().type_id() == TypeId::of::<AllowList>()
}

/// The arguments a setting becomes, its types checked: a switch's `true`
/// is the bare flag (`false` nothing), an array of a repeated flag one
/// argument per item, of a comma-list flag one argument joining them. A
/// relative path is taken from `dir`, the file's own directory.
pub(crate) fn tokens(arg: &Arg, setting: &Setting, file: &Path) -> Result<Vec<Token>, String> {
    let key = &setting.key;
    let scalars: Vec<&Scalar> = match &setting.value {
        Value::One(scalar) => vec![scalar],
        Value::List(items) if repeats(arg) || comma_list(arg) => items.iter().collect(),
        Value::List(_) => return Err(wrong_type(arg, key, "an array", setting.line, file)),
        Value::Tables(_) => return Err(wrong_type(arg, key, "tables", setting.line, file)),
    };
    if scalars.is_empty() {
        return Err(at(file, setting.line, format!("{key}: empty array")));
    }
    let mut values = Vec::new();
    for scalar in scalars {
        values.extend(value_text(arg, key, scalar, file)?);
    }
    if comma_list(arg) {
        let joined: Vec<String> = values.into_iter().map(|(text, _)| text).collect();
        values = vec![(joined.join(","), setting.line)];
    }
    let long = arg.get_long().unwrap_or_default();
    Ok(values
        .into_iter()
        .map(|(text, line)| Token {
            text: match shape(arg) {
                Shape::Switch => format!("--{long}"),
                Shape::Integer | Shape::Text => format!("--{long}={text}"),
            }
            .into(),
            key: key.clone(),
            line,
        })
        .collect())
}

/// A scalar as the flag's value, if its type fits (`None`: a switch set to
/// false, which gives no argument).
fn value_text(
    arg: &Arg,
    key: &str,
    scalar: &Scalar,
    file: &Path,
) -> Result<Option<(String, usize)>, String> {
    let text = match (shape(arg), &scalar.kind) {
        (Shape::Switch, Kind::Bool(set)) => set.then(String::new),
        (Shape::Integer, Kind::Int(n)) => Some(n.to_string()),
        (Shape::Text, Kind::Str(s))
            if arg.get_value_parser().type_id() == TypeId::of::<PathBuf>() =>
        {
            let dir = file.parent().unwrap_or(Path::new(""));
            Some(dir.join(s).to_string_lossy().into_owned())
        }
        (Shape::Text, Kind::Str(s)) => Some(s.clone()),
        (_, kind) => return Err(wrong_type(arg, key, &kind.describe(), scalar.line, file)),
    };
    Ok(text.map(|text| (text, scalar.line)))
}

/// `FILE:LINE: KEY: expected T, found U`.
fn wrong_type(arg: &Arg, key: &str, found: &str, line: usize, file: &Path) -> String {
    let one = match shape(arg) {
        Shape::Switch => "true or false",
        Shape::Integer => "an integer",
        Shape::Text => "a string",
    };
    let expected = match repeats(arg) || comma_list(arg) {
        true => format!("{one} or an array of them"),
        false => one.to_owned(),
    };
    at(
        file,
        line,
        format!("{key}: expected {expected}, found {found}"),
    )
}

#[cfg(test)]
mod tests {
    use super::super::args::Cli;
    use super::super::file;
    use super::*;
    use clap::CommandFactory;

    /// The flags of `sub`, its own and the global ones.
    fn flags(sub: &str) -> Vec<Arg> {
        let command = Cli::command();
        let mut args: Vec<Arg> = command
            .find_subcommand(sub)
            .expect("a subcommand")
            .get_arguments()
            .cloned()
            .collect();
        args.extend(
            command
                .get_arguments()
                .filter(|a| a.is_global_set())
                .cloned(),
        );
        args
    }

    fn tokens_of(sub: &str, text: &str) -> Result<Vec<String>, String> {
        let args = flags(sub);
        let refs: Vec<&Arg> = args.iter().collect();
        let file = file::parse(Path::new("/etc/t/x.toml"), text)?;
        let mut out = Vec::new();
        for setting in &file.settings {
            let arg = flag(&refs, &setting.key).ok_or("no such flag")?;
            let tokens = tokens(arg, setting, &file.path)?;
            out.extend(tokens.iter().map(|t| t.text.to_string_lossy().into_owned()));
        }
        Ok(out)
    }

    #[test]
    fn every_flag_but_the_file_ones_is_a_key() {
        for sub in ["serve", "expose", "echo"] {
            let args = flags(sub);
            let refs: Vec<&Arg> = args.iter().collect();
            let known = known_keys(&refs, sub == "expose");
            for arg in &args {
                let key = key_of(arg).expect("every flag has a long name");
                let expected = !NOT_KEYS.contains(&key.as_str());
                assert_eq!(known.contains(&key), expected, "{sub} {key}");
            }
        }
    }

    #[test]
    fn values_become_the_flags_arguments() {
        let text = "reg_port = 9000\nbind = \"::\"\nno_splice = true\ngrace = \"1m\"\n\
                    allow_clients = [\"10.0.0.0/8\", \"::1\"]\nallow_apps = \"192.0.2.1,192.0.2.2\"\n\
                    secret_file = \"secret\"\nclient_burst = 5\nlog_level = \"debug\"\n";
        assert_eq!(
            tokens_of("serve", text),
            Ok(vec![
                "--reg-port=9000".into(),
                "--bind=::".into(),
                "--no-splice".into(),
                "--grace=1m".into(),
                "--allow-clients=10.0.0.0/8,::1".into(),
                "--allow-apps=192.0.2.1,192.0.2.2".into(),
                "--secret-file=/etc/t/secret".into(),
                "--client-burst=5".into(),
                "--log-level=debug".into(),
            ])
        );
    }

    #[test]
    fn lists_repeat_flags_that_repeat() {
        let text = "relays = [\"a:1\", \"b:2\"]\nlocal = \"127.0.0.1:22\"\nno_reconnect = false\n";
        assert_eq!(
            tokens_of("expose", text),
            Ok(vec![
                "--relay=a:1".into(),
                "--relay=b:2".into(),
                "--local=127.0.0.1:22".into(),
            ])
        );
    }

    #[test]
    fn absolute_paths_stay_as_they_are() {
        assert_eq!(
            tokens_of("serve", "secret_file = \"/run/s\"\n"),
            Ok(vec!["--secret-file=/run/s".into()])
        );
    }

    #[test]
    fn wrong_types_name_the_key_and_line() {
        for (text, message) in [
            (
                "\nreg_port = \"9000\"",
                "/etc/t/x.toml:2: reg_port: expected an integer, found a string",
            ),
            (
                "no_splice = \"yes\"",
                "/etc/t/x.toml:1: no_splice: expected true or false, found a string",
            ),
            (
                "grace = 1.5",
                "/etc/t/x.toml:1: grace: expected a string, found a float",
            ),
            (
                "bind = [\"::\"]",
                "/etc/t/x.toml:1: bind: expected a string, found an array",
            ),
            (
                "allow_apps = [\n\"::1\",\n7]",
                "/etc/t/x.toml:3: allow_apps: expected a string or an array of them, found an integer",
            ),
            (
                "allow_apps = []",
                "/etc/t/x.toml:1: allow_apps: empty array",
            ),
        ] {
            assert_eq!(tokens_of("serve", text), Err(message.into()), "{text}");
        }
    }

    #[test]
    fn unknown_keys_suggest_the_closest() {
        let known: Vec<String> = ["reg_port", "relay_style", "max_apps", "grace"]
            .map(String::from)
            .into();
        let suggest = |key| unknown_key(key, &known);
        assert_eq!(
            suggest("reg_prot"),
            "unknown key \"reg_prot\" (did you mean \"reg_port\"?)"
        );
        assert_eq!(
            suggest("reg-port"),
            "unknown key \"reg-port\" (did you mean \"reg_port\"?)"
        );
        assert_eq!(
            suggest("max_app"),
            "unknown key \"max_app\" (did you mean \"max_apps\"?)"
        );
        assert_eq!(suggest("colour"), "unknown key \"colour\"");
        assert_eq!(
            suggest("verbose"),
            "\"verbose\" cannot be set in a config file (use log_level)"
        );
        assert_eq!(
            suggest("config"),
            "\"config\" cannot be set in a config file"
        );
    }

    #[test]
    fn distances_count_edits() {
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("abc", "abc"), 0);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("reg_prot", "reg_port"), 2);
    }

    #[test]
    fn settings_group_their_aliases() {
        assert_eq!(one_setting("secret_file"), ["secret", "secret_file"]);
        assert_eq!(one_setting("relays"), ["relay", "relays"]);
        assert_eq!(one_setting("grace"), ["grace"]);
    }
}
