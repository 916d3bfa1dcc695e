//! JSON text without serde: string escaping, a small writer that places the
//! commas, and RFC 3339 UTC timestamps, enough for a status object.
//! (`writes_a_status_object` below shows the writer in use.)

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(test)] // only the tests read it
/// `text` as a JSON string, quotes included.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    quote_into(&mut out, text);
    out
}

/// Appends `text` as a JSON string: `"` and `\` escaped, and every control
/// character below U+0020, which RFC 8259 §7 forbids raw in a string.
pub fn quote_into(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < '\u{20}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Writes one JSON value, placing commas and colons itself. Each method
/// returns the writer so that a field reads `w.key("pipes").uint(3)`.
/// Misuse (a value in an object without a key, unbalanced ends) is the
/// caller's bug, caught by debug assertions, never by a peer's input.
#[derive(Debug, Default)]
pub struct JsonWriter {
    out: String,     // the text so far
    open: Vec<Open>, // the containers open now, innermost last
    after_key: bool, // a key was written; its value comes next, no comma
}

/// A container being written.
#[derive(Debug)]
struct Open {
    object: bool, // an object (else an array)
    empty: bool,  // nothing in it yet, so no comma before the next item
}

impl JsonWriter {
    /// A writer with nothing written.
    pub fn new() -> JsonWriter {
        JsonWriter::default()
    }

    /// Opens an object: `{`.
    pub fn begin_object(&mut self) -> &mut Self {
        self.open('{', true)
    }

    /// Closes the innermost object: `}`.
    pub fn end_object(&mut self) -> &mut Self {
        self.close('}', true)
    }

    /// Opens an array: `[`.
    pub fn begin_array(&mut self) -> &mut Self {
        self.open('[', false)
    }

    /// Closes the innermost array: `]`.
    pub fn end_array(&mut self) -> &mut Self {
        self.close(']', false)
    }

    /// A member's name in the current object; its value is written next.
    pub fn key(&mut self, name: &str) -> &mut Self {
        debug_assert!(self.in_object() == Some(true) && !self.after_key);
        self.separate();
        quote_into(&mut self.out, name);
        self.out.push(':');
        self.after_key = true;
        self
    }

    /// A string value.
    pub fn string(&mut self, value: &str) -> &mut Self {
        self.separate_value();
        quote_into(&mut self.out, value);
        self
    }

    /// An unsigned integer value (exact: JSON numbers have no size limit,
    /// though JavaScript reads those above 2^53 rounded).
    pub fn uint(&mut self, value: u64) -> &mut Self {
        self.raw(&value.to_string())
    }

    #[cfg(test)] // only the tests read it
    /// A signed integer value.
    pub fn int(&mut self, value: i64) -> &mut Self {
        self.raw(&value.to_string())
    }

    #[cfg(test)] // only the tests read it
    /// A number; NaN and the infinities, which JSON cannot spell, are `null`.
    pub fn float(&mut self, value: f64) -> &mut Self {
        if value.is_finite() {
            self.raw(&value.to_string())
        } else {
            self.null()
        }
    }

    #[cfg(test)] // only the tests read it
    /// `true` or `false`.
    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.raw(if value { "true" } else { "false" })
    }

    /// `null`.
    pub fn null(&mut self) -> &mut Self {
        self.raw("null")
    }

    /// An array of strings.
    pub fn strings<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) -> &mut Self {
        self.begin_array();
        for value in values {
            self.string(value);
        }
        self.end_array()
    }

    /// The JSON text.
    pub fn finish(self) -> String {
        debug_assert!(self.open.is_empty(), "unclosed container");
        self.out
    }

    fn raw(&mut self, text: &str) -> &mut Self {
        self.separate_value();
        self.out.push_str(text);
        self
    }

    fn open(&mut self, bracket: char, object: bool) -> &mut Self {
        self.separate_value();
        self.out.push(bracket);
        self.open.push(Open {
            object,
            empty: true,
        });
        self
    }

    fn close(&mut self, bracket: char, object: bool) -> &mut Self {
        debug_assert!(self.in_object() == Some(object) && !self.after_key);
        self.open.pop();
        self.out.push(bracket);
        self
    }

    /// Before a value: the comma after a sibling, unless it follows its key.
    fn separate_value(&mut self) {
        if std::mem::take(&mut self.after_key) {
            return;
        }
        debug_assert!(self.in_object() != Some(true), "a value needs a key");
        self.separate();
    }

    /// Before a key, or an array's value: the comma after a sibling.
    fn separate(&mut self) {
        if let Some(open) = self.open.last_mut() {
            if !open.empty {
                self.out.push(',');
            }
            open.empty = false;
        }
    }

    /// Whether the innermost open container is an object; `None` at the top.
    fn in_object(&self) -> Option<bool> {
        self.open.last().map(|open| open.object)
    }
}

/// `t` as an RFC 3339 UTC timestamp to the second, `2024-05-01T12:34:56Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_secs() as i64,
        Err(before) => -(before.duration().as_secs_f64().ceil() as i64),
    };
    let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01: Howard Hinnant's
/// `civil_from_days` ("chrono-Compatible Low-Level Date Algorithms"), which
/// counts in 400-year eras of 146,097 days starting on a March 1st so that
/// the leap day falls at the end of each year.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_status_object() {
        let mut w = JsonWriter::new();
        w.begin_object();
        w.key("version").string("0.1.0");
        w.key("apps").begin_array();
        w.begin_object().key("relayed_port").uint(8081).end_object();
        w.end_array();
        w.end_object();
        assert_eq!(
            w.finish(),
            r#"{"version":"0.1.0","apps":[{"relayed_port":8081}]}"#
        );
    }
    use std::time::Duration;

    #[test]
    fn strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(quote("plain"), r#""plain""#);
        assert_eq!(quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quote("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(quote("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        assert_eq!(quote("é → </script>"), "\"é → </script>\"");
    }

    #[test]
    fn the_writer_places_commas_and_colons() {
        let mut w = JsonWriter::new();
        w.begin_object();
        w.key("n").uint(1).key("neg").int(-2).key("x").float(0.5);
        w.key("inf")
            .float(f64::INFINITY)
            .key("ok")
            .bool(true)
            .key("none")
            .null();
        w.key("empty").begin_array().end_array();
        w.key("obj").begin_object().end_object();
        w.key("ext").strings(["ready 8", "proxy v2"]);
        w.key("nested").begin_array();
        w.begin_object().key("a").string("\"").end_object();
        w.begin_array().uint(1).uint(2).end_array();
        w.end_array();
        w.end_object();
        assert_eq!(
            w.finish(),
            r#"{"n":1,"neg":-2,"x":0.5,"inf":null,"ok":true,"none":null,"empty":[],"obj":{},"ext":["ready 8","proxy v2"],"nested":[{"a":"\""},[1,2]]}"#
        );
    }

    #[test]
    fn a_bare_value_is_valid_json() {
        let mut w = JsonWriter::new();
        w.string("alone");
        assert_eq!(w.finish(), r#""alone""#);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = |secs: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(951_868_799), "2000-02-29T23:59:59Z");
        assert_eq!(at(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(at(253_402_300_799), "9999-12-31T23:59:59Z");
        let before = UNIX_EPOCH - Duration::from_millis(500);
        assert_eq!(rfc3339_utc(before), "1969-12-31T23:59:59Z");
        let subsecond = UNIX_EPOCH + Duration::from_millis(1999);
        assert_eq!(rfc3339_utc(subsecond), "1970-01-01T00:00:01Z");
    }

    #[test]
    fn every_day_of_four_centuries_follows_the_previous_one() {
        // Walks 1970..2370 (an era and more) checking the calendar's own
        // rules, so an off-by-one in a month length or a leap rule shows.
        let month_len = |y: i64, m: i64| match m {
            2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let mut previous = civil_from_days(-1);
        assert_eq!(previous, (1969, 12, 31));
        for days in 0..146_097 + 365 {
            let (y, m, d) = civil_from_days(days);
            let (py, pm, pd) = previous;
            if d == 1 {
                assert_eq!(pd, month_len(py, pm), "the day before {y}-{m}-01");
                assert!((y, m) == (py, pm + 1) || (y, m, pm) == (py + 1, 1, 12));
            } else {
                assert_eq!((y, m, d), (py, pm, pd + 1));
            }
            previous = (y, m, d);
        }
        assert_eq!(previous, (2370, 12, 31));
    }
}
