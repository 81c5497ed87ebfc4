//! Python's `json.dumps` over template values, for the `tojson` filter: chat templates are written
//! against transformers, whose `tojson` is `json.dumps` (no HTML escaping, Python's separators and
//! float spelling), and the tokens must come out the same.

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

/// The options of `json.dumps` that transformers' `tojson` passes on.
pub struct DumpOptions {
    pub ensure_ascii: bool,
    /// `None` writes everything on one line; `Some(unit)` puts each item on its own line.
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
}

impl DumpOptions {
    /// `json.dumps` defaults for an indent: items end in "," with one, ", " without.
    pub fn new(indent: Option<String>) -> Self {
        let item_separator = if indent.is_some() { "," } else { ", " };
        Self { ensure_ascii: false, indent, item_separator: item_separator.into(), key_separator: ": ".into(), sort_keys: false }
    }
}

pub fn dumps(value: &Value, options: &DumpOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, value, options, 0)?;
    Ok(out)
}

fn write_value(out: &mut String, value: &Value, options: &DumpOptions, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default(), options.ensure_ascii),
        ValueKind::Number => write_number(out, value)?,
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), &items, options, depth, |out, item, depth| {
                write_value(out, item, options, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((key_string(&key)?, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, ('{', '}'), &entries, options, depth, |out, (key, item), depth| {
                write_string(out, key, options.ensure_ascii);
                out.push_str(&options.key_separator);
                write_value(out, item, options, depth)
            })?;
        }
        kind => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson cannot serialize a value of type {kind}")));
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    options: &DumpOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(unit) = &options.indent {
            out.push('\n');
            (0..depth).for_each(|_| out.push_str(unit));
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&options.item_separator);
        }
        newline(out, depth + 1);
        write_item(out, item, depth + 1)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// JSON object keys as Python writes them: strings as they are, scalars by their JSON spelling.
fn key_string(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None | ValueKind::Bool | ValueKind::Number => {
            let mut out = String::new();
            write_value(&mut out, key, &DumpOptions::new(None), 0)?;
            Ok(out)
        }
        kind => Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: keys must be strings, not {kind}"))),
    }
}

fn write_number(out: &mut String, value: &Value) -> Result<(), Error> {
    if value.is_integer() {
        let n = i128::try_from(value.clone())?;
        out.push_str(&n.to_string());
    } else {
        out.push_str(&python_float_repr(f64::try_from(value.clone())?));
    }
    Ok(())
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional from 1e-4 up to 1e16,
/// otherwise scientific with a signed two-digit exponent (`1e-05`, `1e+16`).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's `{:e}` also gives the shortest round-trip digits: "-1.25e-7".
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    // The decimal point sits after `point` digits.
    let point = exponent.parse::<i32>().unwrap_or(0) + 1;
    let body = if !(-3..=16).contains(&point) {
        let exponent = point - 1;
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        format!("{first}{fraction}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs())
    } else if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if (point as usize) < digits.len() {
        let (whole, fraction) = digits.split_at(point as usize);
        format!("{whole}.{fraction}")
    } else {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    };
    format!("{sign}{body}")
}

/// A JSON string as Python's encoder writes it; with `ensure_ascii`, everything outside printable
/// ASCII becomes `\uXXXX` (UTF-16 surrogate pairs above the BMP).
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_spelled_as_python_spells_them() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (21.0, "21.0"),
            (0.1, "0.1"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456.789, "123456.789"),
            (-2.5e-300, "-2.5e-300"),
            (6.02e23, "6.02e+23"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, python) in cases {
            assert_eq!(python_float_repr(x), python, "repr({x:?})");
        }
    }

    #[test]
    fn dumps_matches_json_dumps() {
        let value = Value::from_serialize(serde_json::json!({"a": "é\"\n\u{1}", "b": [1, 2.5, {}], "c": []}));
        let compact = dumps(&value, &DumpOptions::new(None)).unwrap();
        assert_eq!(compact, r#"{"a": "é\"\n\u0001", "b": [1, 2.5, {}], "c": []}"#);
        let indented = dumps(&value, &DumpOptions::new(Some("  ".into()))).unwrap();
        assert_eq!(indented, "{\n  \"a\": \"é\\\"\\n\\u0001\",\n  \"b\": [\n    1,\n    2.5,\n    {}\n  ],\n  \"c\": []\n}");
        let ascii = DumpOptions { ensure_ascii: true, ..DumpOptions::new(None) };
        assert_eq!(dumps(&Value::from("é🦙"), &ascii).unwrap(), r#""\u00e9\ud83e\udd99""#);
    }
}
