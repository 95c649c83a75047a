//! The Prometheus text exposition format (version 0.0.4), written by both processes: the agent's
//! `/metrics` and the coordinator's `--metrics-file`. Also a reader of the same format, for tests
//! and tools that check what was written.
//!
//! Names must match `[a-zA-Z_:][a-zA-Z0-9_:]*`; label values are escaped (`\\`, `\"`, `\n`);
//! numbers are written as Prometheus parses them (`+Inf`, `-Inf`, `NaN`).
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Builds a text-format document family by family.
#[derive(Debug, Default)]
pub struct TextWriter {
    out: String,
}

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
}

impl TextWriter {
    pub fn new() -> TextWriter {
        TextWriter::default()
    }

    /// `# HELP` and `# TYPE` of the family whose samples follow.
    pub fn family(&mut self, name: &str, help: &str, kind: Type) {
        let kind = match kind {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A histogram's series: `counts[i]` observations at most `bounds[i]` (not cumulative; this
    /// makes them so), `count` in all, their `sum`.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
        count: u64,
    ) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (b, c) in bounds.iter().zip(counts) {
            cumulative += c;
            let le = number(*b);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative as f64);
        }
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, count as f64);
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Per-bucket (not cumulative) counts of `values` for `bounds`: a value goes to the first bucket
/// whose bound is at least the value, or to none (only `+Inf`) past the last.
pub fn bucket_counts(bounds: &[f64], values: impl IntoIterator<Item = f64>) -> (Vec<u64>, f64, u64) {
    let mut counts = vec![0; bounds.len()];
    let (mut sum, mut count) = (0.0, 0);
    for v in values {
        if let Some(i) = bounds.iter().position(|b| v <= *b) {
            counts[i] += 1;
        }
        sum += v;
        count += 1;
    }
    (counts, sum, count)
}

/// A sample value as Prometheus spells it.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One sample read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Reads the samples of a text-format document (comments skipped). Errors name the line.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line}", n + 1);
        let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return Err(bad("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let mut consumed = None;
            loop {
                while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                    chars.next();
                }
                match chars.peek() {
                    Some((i, '}')) => {
                        consumed = Some(*i + 1);
                        break;
                    }
                    None => break,
                    _ => {}
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value must be quoted"));
                }
                let mut value = String::new();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => break,
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                if !closed {
                    return Err(bad("unterminated label value"));
                }
                labels.insert(key.trim().to_string(), value);
            }
            let end = consumed.ok_or_else(|| bad("unterminated label set"))?;
            rest = &after[end..];
        }
        let value = rest.split_whitespace().next().ok_or_else(|| bad("no value"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse::<f64>().map_err(|_| bad("bad value"))?,
        };
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}

/// The value of the sample named `name` whose labels include every one of `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_text_reads_back() {
        let mut w = TextWriter::new();
        w.family("ferry_x_total", "Things.\nMore.", Type::Counter);
        w.sample("ferry_x_total", &[("app", "w\"e\\b\n"), ("outcome", "ok")], 3.0);
        w.sample("ferry_y", &[], f64::INFINITY);
        w.family("ferry_d_seconds", "Durations.", Type::Histogram);
        let (counts, sum, count) = bucket_counts(&[1.0, 10.0], [0.5, 5.0, 50.0]);
        w.histogram("ferry_d_seconds", &[("env", "prod")], &[1.0, 10.0], &counts, sum, count);
        let text = w.finish();
        assert!(text.contains("# HELP ferry_x_total Things.\\nMore.\n"), "{text}");
        assert!(text.contains("ferry_d_seconds_bucket{env=\"prod\",le=\"10\"} 2\n"), "{text}");
        let samples = parse(&text).expect("parses");
        assert_eq!(value(&samples, "ferry_x_total", &[("app", "w\"e\\b\n")]), Some(3.0));
        assert_eq!(value(&samples, "ferry_y", &[]), Some(f64::INFINITY));
        assert_eq!(value(&samples, "ferry_d_seconds_bucket", &[("le", "1")]), Some(1.0));
        assert_eq!(value(&samples, "ferry_d_seconds_bucket", &[("le", "+Inf")]), Some(3.0));
        assert_eq!(value(&samples, "ferry_d_seconds_sum", &[("env", "prod")]), Some(55.5));
        assert_eq!(value(&samples, "ferry_d_seconds_count", &[]), Some(3.0));
    }

    #[test]
    fn malformed_lines_are_named() {
        for bad in ["x{a=b} 1", "x{a=\"b} 1", "x", "x 1z", "x{a=\"b\" 1"] {
            let err = parse(&format!("# ok\n{bad}\n")).expect_err(bad);
            assert!(err.starts_with("line 2:"), "{err}");
        }
    }
}
