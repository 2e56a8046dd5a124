//! The payload fingerprint of a JSON message: what the ledger remembers of a body to tell a
//! duplicate (same key, same payload) from a key conflict (same key, different payload).
//!
//! Two bodies are the same payload when they are the same JSON value, compared exactly; the
//! fingerprint is SHA-256 of one canonical text per value. That text is RFC 8785's (the JSON
//! Canonicalization Scheme) but for three points, each so that equal values hash equal and
//! different values do not:
//!
//! - **Numbers are exact decimals**, not IEEE-754 doubles: `1`, `1.0`, `1.00`, `10e-1`, `0.1E1`
//!   are one value; `18446744073709551616` and `18446744073709551617`, or `0.1` and
//!   `0.10000000000000001`, are two (RFC 8785 rounds each pair to one double). A number is
//!   written the way ECMAScript writes a double (`Number.prototype.toString`), from all of its
//!   significant digits: `100`, `1.5`, `0.001`, `1e+21`, `1.5e-7`, `-2`. So for a number of at
//!   most 15 significant digits inside the range of doubles the text is RFC 8785's. `-0` is `0`
//!   (as in RFC 8785). A nonzero number whose exponent has more than 18 digits keeps its own
//!   text: still exact, so never equal to another value's, only not equal to another spelling
//!   of itself.
//! - **Object keys are sorted by the UTF-8 bytes of their decoded value** (code point order).
//!   RFC 8785 sorts by UTF-16 code units; the two differ only between keys with characters in
//!   U+E000–U+FFFF and keys with characters above U+FFFF at the same place.
//! - **A key repeated in one object counts once, with its last value**: what serde_json keeps in
//!   a map or a `Value`, so what a handler sees. (RFC 8785 refuses such input. A derived struct
//!   refuses a repeated field of its own, which makes the body `malformed` before any
//!   fingerprint.)
//!
//! Strings are decoded and written one way: `"\u00e9"` and `"é"`, `"\/"` and `"/"` are one
//! string; `"` and `\` are escaped, controls below U+0020 as `\b \t \n \f \r` or `\u00xx`, and
//! every other character is written as itself. Whitespace outside strings goes.
//!
//! A body that is not JSON (RFC 8259: UTF-8, one value, nothing after it) hashes as its bytes,
//! as do JSON nested deeper than [`MAX_DEPTH`] and JSON holding a string with an unpaired
//! surrogate escape (`"\ud800"` is not Unicode text). A raw hash never equals a canonical one
//! of another body: the canonical text is JSON without such strings.
//!
//! The hot path: one pass over the bytes writing the canonical text into one buffer, hashed
//! once. No value tree, nothing allocated per number or per string without escapes, and an
//! object whose keys come in order is not copied again.
//!
//! Over 400 lines on purpose: the reader is one unit with the cases that pin its canonical form
//! (the code is about 400 lines; the tests are the rest).

use sha2::{Digest, Sha256};
use std::io::Write as _;

/// Nesting of arrays and objects deeper than this hashes as bytes. Above serde_json's own limit
/// (127), so every body serde_json decodes is canonicalized; it also bounds the recursion here.
const MAX_DEPTH: usize = 128;

/// The most digits an exponent may have after its leading zeros to be read as an `i64`
/// (below 10^18, so the arithmetic on it cannot overflow).
const MAX_EXPONENT_DIGITS: usize = 18;

/// ECMAScript writes a number below 10^21 without an exponent.
const MAX_PLAIN_DIGITS: i64 = 21;

/// SHA-256 of the body's canonical JSON; of the bytes when the body is not JSON. What
/// `#[derive(Message)]` uses for [`Message::fingerprint`].
///
/// The same JSON value gives the same hash, whatever its key order, whitespace, string escapes
/// or spelling of numbers (`1`, `1.0`, `10e-1`); numbers compare as exact decimals, not as
/// doubles (`18446744073709551616` is not `18446744073709551617`); of a key repeated in one
/// object, the last counts. Object keys are sorted by the UTF-8 bytes of their decoded value.
///
/// [`Message::fingerprint`]: crate::Message::fingerprint
pub fn json_fingerprint(body: &[u8]) -> [u8; 32] {
    match canonical(body) {
        Some(text) => Sha256::digest(&text).into(),
        None => Sha256::digest(body).into(),
    }
}

/// The canonical text of a JSON body; `None` when the body is not JSON, is nested deeper than
/// [`MAX_DEPTH`], or holds an unpaired surrogate.
pub(crate) fn canonical(body: &[u8]) -> Option<Vec<u8>> {
    // JSON text is UTF-8 (RFC 8259 §8.1). Checked once here: every string's bytes are text.
    std::str::from_utf8(body).ok()?;
    let mut writer = Writer {
        body,
        pos: 0,
        out: Vec::with_capacity(body.len()),
        // Enough for a typical message's objects without growing.
        members: Vec::with_capacity(16),
        names: Vec::new(),
        scratch: Vec::new(),
    };
    writer.whitespace();
    writer.value(0)?;
    writer.whitespace();
    (writer.pos == body.len()).then_some(writer.out)
}

/// A strict JSON reader that writes the canonical text as it goes.
struct Writer<'a> {
    body: &'a [u8],
    /// The next byte of `body` to read.
    pos: usize,
    /// The canonical text so far.
    out: Vec<u8>,
    /// The members of the objects being written, the innermost object's last.
    members: Vec<Member>,
    /// The decoded names of members whose key has escapes (other names are read in `body`).
    names: Vec<u8>,
    /// Where an object's members are put in order.
    scratch: Vec<u8>,
}

/// One member of an object being written.
#[derive(Debug, Clone, Copy)]
struct Member {
    name: Name,
    /// Where `"name":value` is in `out`.
    start: usize,
    end: usize,
}

/// Where a member's decoded name is.
#[derive(Debug, Clone, Copy)]
enum Name {
    /// `body[start..end]`: the key had no escapes.
    InBody(usize, usize),
    /// `names[start..end]`.
    Decoded(usize, usize),
}

fn name<'s>(body: &'s [u8], names: &'s [u8], member: &Member) -> &'s [u8] {
    match member.name {
        Name::InBody(start, end) => &body[start..end],
        Name::Decoded(start, end) => &names[start..end],
    }
}

impl Writer<'_> {
    /// `depth`: the arrays and objects around this value.
    fn value(&mut self, depth: usize) -> Option<()> {
        match *self.body.get(self.pos)? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'[');
        self.whitespace();
        if !self.eat(b']') {
            loop {
                self.value(depth)?;
                self.whitespace();
                match self.next()? {
                    b',' => self.out.push(b','),
                    b']' => break,
                    _ => return None,
                }
                self.whitespace();
            }
        }
        self.out.push(b']');
        Some(())
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'{');
        let (first, base, names) = (self.out.len(), self.members.len(), self.names.len());
        self.whitespace();
        if !self.eat(b'}') {
            loop {
                if self.body.get(self.pos) != Some(&b'"') {
                    return None;
                }
                let start = self.out.len();
                let name = self.name()?;
                self.whitespace();
                if !self.eat(b':') {
                    return None;
                }
                self.out.push(b':');
                self.whitespace();
                self.value(depth)?;
                let end = self.out.len();
                self.members.push(Member { name, start, end });
                self.whitespace();
                match self.next()? {
                    b',' => self.out.push(b','),
                    b'}' => break,
                    _ => return None,
                }
                self.whitespace();
            }
        }
        self.sort_members(first, base);
        self.members.truncate(base);
        self.names.truncate(names);
        self.out.push(b'}');
        Some(())
    }

    /// Puts the members `members[base..]`, written from `out[first]` on, in the order of their
    /// names, keeping only the last of a repeated name.
    fn sort_members(&mut self, first: usize, base: usize) {
        let (body, names) = (self.body, &self.names[..]);
        let members = &mut self.members[base..];
        // In order and no name repeated (one member; a producer that sorts): the text stands.
        if members
            .windows(2)
            .all(|pair| name(body, names, &pair[0]) < name(body, names, &pair[1]))
        {
            return;
        }
        // Equal names stay in the order they came in, so the last one is last.
        members.sort_unstable_by(|a, b| {
            name(body, names, a)
                .cmp(name(body, names, b))
                .then(a.start.cmp(&b.start))
        });
        self.scratch.clear();
        self.scratch.reserve(self.out.len() - first);
        for (i, member) in members.iter().enumerate() {
            let overridden = members
                .get(i + 1)
                .is_some_and(|next| name(body, names, next) == name(body, names, member));
            if overridden {
                continue;
            }
            if !self.scratch.is_empty() {
                self.scratch.push(b',');
            }
            self.scratch
                .extend_from_slice(&self.out[member.start..member.end]);
        }
        self.out.truncate(first);
        self.out.extend_from_slice(&self.scratch);
    }

    /// Reads the string at `pos`: the range of its content in `body`, and whether it has escapes.
    fn string_token(&mut self) -> Option<(usize, usize, bool)> {
        let start = self.pos + 1;
        let (mut end, mut escaped) = (start, false);
        loop {
            end += self
                .body
                .get(end..)?
                .iter()
                .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)?;
            match self.body[end] {
                b'"' => break,
                // Whatever is escaped, it is not the closing quote; serde_json checks the rest.
                b'\\' => (end, escaped) = (end + 2, true),
                _ => return None,
            }
        }
        self.pos = end + 1;
        Some((start, end, escaped))
    }

    fn string(&mut self) -> Option<()> {
        let (start, end, escaped) = self.string_token()?;
        if escaped {
            self.write_decoded(start, end)?;
        } else {
            self.write_plain(start, end);
        }
        Some(())
    }

    /// A member's key: written like any string, and remembered for the sort.
    fn name(&mut self) -> Option<Name> {
        let (start, end, escaped) = self.string_token()?;
        if !escaped {
            self.write_plain(start, end);
            return Some(Name::InBody(start, end));
        }
        let decoded = self.write_decoded(start, end)?;
        let from = self.names.len();
        self.names.extend_from_slice(decoded.as_bytes());
        Some(Name::Decoded(from, self.names.len()))
    }

    /// No escape, no quote, no control character: the string is canonical as it stands.
    fn write_plain(&mut self, start: usize, end: usize) {
        self.out.extend_from_slice(&self.body[start - 1..=end]);
    }

    /// serde_json decodes the escapes (refusing an unpaired surrogate) and writes the string
    /// back with only the escapes the canonical form has.
    fn write_decoded(&mut self, start: usize, end: usize) -> Option<String> {
        let decoded: String = serde_json::from_slice(&self.body[start - 1..=end]).ok()?;
        serde_json::to_writer(&mut self.out, &decoded).ok()?;
        Some(decoded)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if !self.body.get(self.pos..)?.starts_with(word) {
            return None;
        }
        self.pos += word.len();
        self.out.extend_from_slice(word);
        Some(())
    }

    /// Reads a number (RFC 8259's grammar) and writes its exact value in the canonical form.
    fn number(&mut self) -> Option<()> {
        let body = self.body;
        let start = self.pos;
        let negative = body[start] == b'-';
        let int_start = start + usize::from(negative);
        let int_end = match body.get(int_start)? {
            b'0' => int_start + 1,
            b'1'..=b'9' => digits_end(body, int_start),
            _ => return None,
        };
        let mut end = int_end;
        let mut fraction = end..end;
        if body.get(end) == Some(&b'.') {
            let fraction_end = digits_end(body, end + 1);
            if fraction_end == end + 1 {
                return None;
            }
            fraction = end + 1..fraction_end;
            end = fraction_end;
        }
        let mut exponent = Some(0);
        if let Some(b'e' | b'E') = body.get(end) {
            end += 1;
            let negative_exponent = body.get(end) == Some(&b'-');
            if let Some(b'-' | b'+') = body.get(end) {
                end += 1;
            }
            let exponent_end = digits_end(body, end);
            if exponent_end == end {
                return None;
            }
            exponent = read_exponent(&body[end..exponent_end], negative_exponent);
            end = exponent_end;
        }
        self.pos = end;

        // The digits before and after the point, as one sequence.
        let (int, fraction) = (&body[int_start..int_end], &body[fraction]);
        let digit = |k: usize| match k.checked_sub(int.len()) {
            None => int[k],
            Some(k) => fraction[k],
        };
        let count = int.len() + fraction.len();
        let Some(first) = (0..count).find(|&k| digit(k) != b'0') else {
            // Zero, whatever its sign, fraction or exponent.
            self.out.push(b'0');
            return Some(());
        };
        let last = (first..count).rev().find(|&k| digit(k) != b'0')?;
        // The value is ±0.D × 10^point, D the significant digits `first..=last`.
        let point = exponent.and_then(|exponent| {
            let int_len = i64::try_from(int.len()).ok()?;
            let first = i64::try_from(first).ok()?;
            exponent.checked_add(int_len)?.checked_sub(first)
        });
        let out = &mut self.out;
        let Some(point) = point else {
            out.extend_from_slice(&body[start..end]);
            return Some(());
        };
        let length = i64::try_from(last + 1 - first).ok()?;
        if negative {
            out.push(b'-');
        }
        if length <= point && point <= MAX_PLAIN_DIGITS {
            // 1500
            out.extend((first..=last).map(digit));
            out.resize(out.len() + usize::try_from(point - length).ok()?, b'0');
        } else if 0 < point && point <= MAX_PLAIN_DIGITS {
            // 1.5
            let split = first + usize::try_from(point).ok()?;
            out.extend((first..split).map(digit));
            out.push(b'.');
            out.extend((split..=last).map(digit));
        } else if -6 < point && point <= 0 {
            // 0.0015
            out.extend_from_slice(b"0.");
            out.resize(out.len() + usize::try_from(-point).ok()?, b'0');
            out.extend((first..=last).map(digit));
        } else {
            // 1.5e+21, 1.5e-7
            out.push(digit(first));
            if length > 1 {
                out.push(b'.');
                out.extend((first + 1..=last).map(digit));
            }
            let exponent = point.checked_sub(1)?;
            let sign = if exponent > 0 { '+' } else { '-' };
            // Writing into a Vec cannot fail.
            let _ = write!(out, "e{sign}{}", exponent.unsigned_abs());
        }
        Some(())
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.body.get(self.pos) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.body.get(self.pos) == Some(&byte);
        self.pos += usize::from(found);
        found
    }

    fn next(&mut self) -> Option<u8> {
        let byte = *self.body.get(self.pos)?;
        self.pos += 1;
        Some(byte)
    }
}

/// Where the run of ASCII digits from `from` ends.
fn digits_end(body: &[u8], from: usize) -> usize {
    from + body.get(from..).map_or(0, |rest| {
        rest.iter().take_while(|b| b.is_ascii_digit()).count()
    })
}

/// The exponent written `digits` (negated when `negative`); `None` past
/// [`MAX_EXPONENT_DIGITS`] significant digits.
fn read_exponent(digits: &[u8], negative: bool) -> Option<i64> {
    let significant = match digits.iter().position(|&d| d != b'0') {
        Some(first) => &digits[first..],
        None => &[],
    };
    if significant.len() > MAX_EXPONENT_DIGITS {
        return None;
    }
    let value = significant
        .iter()
        .fold(0, |value, &d| value * 10 + i64::from(d - b'0'));
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(body: &str) -> String {
        let text = canonical(body.as_bytes()).unwrap_or_else(|| panic!("not JSON: {body}"));
        String::from_utf8(text).unwrap()
    }

    fn same(a: &str, b: &str) -> bool {
        json_fingerprint(a.as_bytes()) == json_fingerprint(b.as_bytes())
    }

    #[test]
    fn numbers_have_one_text_per_exact_value() {
        for (written, canonical) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0e-0", "0"),
            ("0.000e+5", "0"),
            ("0e99999999999999999999999", "0"),
            ("1", "1"),
            ("1.0", "1"),
            ("1.00", "1"),
            ("10e-1", "1"),
            ("0.1E1", "1"),
            ("100e-2", "1"),
            ("1e2", "100"),
            ("1E+2", "100"),
            ("-1.5E+3", "-1500"),
            ("123.4560", "123.456"),
            ("0.1", "0.1"),
            ("0.10000000000000001", "0.10000000000000001"),
            ("1.0000000000000000001", "1.0000000000000000001"),
            ("-0.00012", "-0.00012"),
            ("0.000001", "0.000001"),
            ("1e-7", "1e-7"),
            ("0.00000015", "1.5e-7"),
            ("9223372036854775807", "9223372036854775807"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("18446744073709551615", "18446744073709551615"),
            ("18446744073709551616", "18446744073709551616"),
            ("18446744073709551617", "18446744073709551617"),
            ("1e20", "100000000000000000000"),
            ("1e21", "1e+21"),
            ("123456789012345678901", "123456789012345678901"),
            ("1234567890123456789012", "1.234567890123456789012e+21"),
            ("1e400", "1e+400"),
            ("-1e-400", "-1e-400"),
            ("1e999999999999999999", "1e+999999999999999999"),
            ("1e-999999999999999999", "1e-999999999999999999"),
            ("0.001e-999999999999999999", "1e-1000000000000000002"),
            // An exponent of 19 digits keeps its own (exact) text.
            ("1e9223372036854775807", "1e9223372036854775807"),
            ("-12E-99999999999999999999", "-12E-99999999999999999999"),
        ] {
            assert_eq!(canon(written), canonical, "{written}");
            assert_eq!(canon(canonical), canonical, "{canonical} is not stable");
        }
    }

    /// RFC 8785 §3.2.2.3's example: the same text wherever a double holds the number exactly
    /// enough (at most 15 significant digits); the exact digits where it would round.
    #[test]
    fn numbers_agree_with_rfc_8785_where_doubles_are_exact_enough() {
        assert_eq!(
            canon(
                r#"{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001]}"#
            ),
            r#"{"numbers":[333333333.33333329,1e+30,4.5,0.002,1e-27]}"#
        );
    }

    #[test]
    fn very_long_numbers_are_exact_and_do_not_panic() {
        let long = format!("1{}", "0".repeat(100_000));
        assert_eq!(canon(&long), "1e+100000");
        assert!(same(&long, "1e100000"));
        assert!(same(&long, &format!("{long}.{}", "0".repeat(100_000))));
        let tiny = format!("0.{}1", "0".repeat(100_000));
        assert_eq!(canon(&tiny), "1e-100001");
        let digits = format!("1.{}1", "0".repeat(100_000));
        assert_eq!(canon(&digits), digits);
        assert!(!same(&digits, "1"));
        assert!(!same(
            &format!("{}7", "9".repeat(50_000)),
            &"9".repeat(50_001)
        ));
    }

    #[test]
    fn strings_have_one_text_per_value() {
        for (written, canonical) in [
            (r#""é""#, r#""é""#),
            (r#""\u00e9""#, r#""é""#),
            (r#""\u00E9""#, r#""é""#),
            (r#""\u0041\/""#, r#""A/""#),
            (r#""\ud83d\ude00""#, "\"\u{1F600}\""),
            (r#""\u000a\n""#, r#""\n\n""#),
            (r#""\u0008\u0009\u000c\u000d""#, r#""\b\t\f\r""#),
            (r#""\u001F\u0000""#, r#""\u001f\u0000""#),
            (r#""\u0022\u005c""#, r#""\"\\""#),
            (r#""\u007f\u2028""#, "\"\u{7f}\u{2028}\""),
        ] {
            assert_eq!(canon(written), canonical, "{written}");
            assert_eq!(canon(canonical), canonical, "{canonical} is not stable");
        }
        assert!(same(r#"{"name":"José"}"#, r#"{"name":"Jos\u00e9"}"#));
        assert!(!same(r#"{"name":"José"}"#, r#"{"name":"Jose\u0301"}"#));
    }

    #[test]
    fn keys_are_sorted_by_decoded_value_and_the_last_repeated_one_counts() {
        assert_eq!(
            canon(r#"{"b":1,"a":{"d":[{"z":0,"y":0}],"c":2}}"#),
            r#"{"a":{"c":2,"d":[{"y":0,"z":0}]},"b":1}"#
        );
        // Code point order of the decoded keys, not the order of their escaped spellings.
        assert_eq!(
            canon(r#"{"é":1,"z":2,"\u0022":3,"\u0062":4,"a":5,"":6}"#),
            r#"{"":6,"\"":3,"a":5,"b":4,"z":2,"é":1}"#
        );
        assert_eq!(
            canon("{\"\u{FFFD}\":1,\"\u{1F600}\":2}"),
            "{\"\u{FFFD}\":1,\"\u{1F600}\":2}"
        );
        assert_eq!(canon(r#"{"a":1,"b":2,"a":3}"#), r#"{"a":3,"b":2}"#);
        assert_eq!(canon(r#"{"a":1,"\u0061":2}"#), r#"{"a":2}"#);
        assert_eq!(canon(r#"{"a":{"x":1},"a":{"y":2}}"#), r#"{"a":{"y":2}}"#);
        // What a handler sees: serde_json keeps the last of a repeated key in a map.
        let value: serde_json::Value = serde_json::from_str(r#"{"a":1,"a":3}"#).unwrap();
        assert_eq!(value["a"], 3);
    }

    #[test]
    fn equal_payloads_hash_equal() {
        let payment = r#"{"payment_id":"p1","amount":1,"meta":{"b":1,"a":[1,2]},"note":"é"}"#;
        for same_payment in [
            r#"{ "meta": {"a": [1, 2], "b": 1}, "amount": 1, "payment_id": "p1", "note": "é" }"#,
            r#"{"payment_id":"p1","amount":1.0,"meta":{"b":1.00,"a":[10e-1,2]},"note":"\u00e9"}"#,
            "\t{\"note\":\"\\u00E9\",\"meta\":{\"a\":[0.1E1,200e-2],\"b\":100e-2},\n\"amount\":1e0,\"payment_id\":\"\\u0070\\u0031\"}\r\n",
            r#"{"payment_id":"p1","amount":-0,"amount":1,"meta":{"b":1,"a":[1,2]},"note":"é"}"#,
        ] {
            assert!(same(payment, same_payment), "{same_payment}");
        }
        assert!(same("[0]", "[-0]"));
        assert!(same("[0]", "[-0.0e-0]"));
    }

    #[test]
    fn different_payloads_hash_differently() {
        for (a, b) in [
            ("18446744073709551616", "18446744073709551617"),
            ("1", "1.0000000000000000001"),
            ("0.1", "0.10000000000000001"),
            ("9007199254740993", "9007199254740992"),
            ("1e400", "1e401"),
            ("1e-400", "0"),
            ("-1", "1"),
            ("1", r#""1""#),
            ("[1,2]", "[2,1]"),
            (r#"{"a":1}"#, r#"{"a":1,"b":null}"#),
            (r#"{"a":[]}"#, r#"{"a":{}}"#),
            (r#""a\u0000""#, r#""a""#),
            ("true", "false"),
            ("null", r#""null""#),
        ] {
            assert!(!same(a, b), "{a} and {b}");
        }
    }

    #[test]
    fn what_is_not_json_hashes_as_its_bytes() {
        for body in [
            "",
            " ",
            "not json",
            "01",
            "-",
            "-a",
            "1.",
            ".5",
            "+1",
            "1e",
            "1e+",
            "0x1",
            "[1,]",
            "[1 2]",
            "{\"a\":1,}",
            "{\"a\"}",
            "{a:1}",
            "{\"a\":1",
            "[",
            "\"abc",
            "\"a\tb\"",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\ud800\"",
            "[\"\\udc00\\ud800\"]",
            "tru",
            "nulls",
            "1 2",
            "\u{feff}{}",
            "{\"a\":1}}",
            "NaN",
            "Infinity",
        ] {
            assert_eq!(canonical(body.as_bytes()), None, "{body:?}");
            let bytes: [u8; 32] = Sha256::digest(body.as_bytes()).into();
            assert_eq!(json_fingerprint(body.as_bytes()), bytes, "{body:?}");
        }
        assert_eq!(canonical(b"\"\xff\""), None);
        assert_eq!(canonical(b"{\"a\":\"\xc3\"}"), None);
    }

    #[test]
    fn deep_nesting_up_to_the_limit_is_canonical_and_beyond_it_does_not_panic() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects =
            |depth: usize| format!("{}1{}", r#"{"b":0, "a":"#.repeat(depth), "}".repeat(depth));
        for depth in [crate::MAX_JSON_DEPTH, MAX_DEPTH] {
            assert_eq!(canon(&nested(depth)), nested(depth));
            assert_eq!(
                canon(&objects(depth)),
                format!(
                    "{}1{}",
                    r#"{"a":"#.repeat(depth),
                    r#","b":0}"#.repeat(depth)
                )
            );
        }
        assert_eq!(canonical(nested(MAX_DEPTH + 1).as_bytes()), None);
        assert_eq!(canonical(objects(MAX_DEPTH + 1).as_bytes()), None);
        let abyss = "[".repeat(1_000_000);
        assert_eq!(canonical(abyss.as_bytes()), None);
        json_fingerprint(abyss.as_bytes());
    }

    /// The fingerprint before numbers became exact decimals: serde_json's `Value`, keys sorted.
    fn fingerprint_before(body: &[u8]) -> [u8; 32] {
        fn write(value: &serde_json::Value, out: &mut Vec<u8>) {
            use serde_json::Value;
            match value {
                Value::Object(object) => {
                    let mut fields: Vec<_> = object.iter().collect();
                    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
                    out.push(b'{');
                    for (i, (name, value)) in fields.into_iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        serde_json::to_writer(&mut *out, name).unwrap();
                        out.push(b':');
                        write(value, out);
                    }
                    out.push(b'}');
                }
                Value::Array(items) => {
                    out.push(b'[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write(item, out);
                    }
                    out.push(b']');
                }
                scalar => serde_json::to_writer(&mut *out, scalar).unwrap(),
            }
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Sha256::digest(body).into();
        };
        let mut text = Vec::new();
        write(&value, &mut text);
        Sha256::digest(&text).into()
    }

    /// Stored fingerprints stay valid across the upgrade for bodies whose numbers are integers
    /// of 64 bits or less written without fraction or exponent (and for bodies that are not
    /// JSON); only other numbers changed their text.
    #[test]
    fn fingerprints_of_integer_bodies_are_what_they_were() {
        for body in [
            r#"{"payment_id":"7b0c2a4e-8a3e-4a53-9a52-1f7f2d8a0c11","account_id":"acct-1","amount_cents":12500}"#,
            r#"{ "b": [1, -2, 0, 18446744073709551615, -9223372036854775808], "a": {"y": null, "x": true} }"#,
            r#"{"\u00e9\n":"\u0041\"\\\/\u001f","a":"😀","":false,"z":[{},[]],"a":"last"}"#,
            r#""just a string""#,
            "[]",
            "not json",
            "",
        ] {
            assert_eq!(
                json_fingerprint(body.as_bytes()),
                fingerprint_before(body.as_bytes()),
                "{body}"
            );
        }
        for changed in ["[1.0]", "[-0]", "[18446744073709551616]", "[1e2]"] {
            assert_ne!(
                json_fingerprint(changed.as_bytes()),
                fingerprint_before(changed.as_bytes()),
                "{changed}"
            );
        }
    }
}
