//! Rendered files: templates with `{{ name }}` placeholders, filled in by the agent at staging.
//!
//! The values are the manifest's vars (`env`, `vars.NAME`, set per environment by the
//! coordinator), what only the host knows or is told at Commit ([`AGENT_VALUES`]), and
//! `secrets.NAME`: the path of the file that holds a secret on the host (never its value), and
//! `labels.NAME`: this host's label (the manifest holds every host's, as `labels:HOST:NAME`). A
//! placeholder is `{{`, optional spaces, a name of `[A-Za-z0-9_.-]`, optional spaces, `}}`; any
//! other `{{` is an error, so a typo never ships as literal text. A name without a value is an
//! error naming it and its line. The coordinator checks every template of a build with the same
//! rules before any host changes ([`names`]).

/// The largest template the agent reads.
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;
/// The largest inline template (the environment file).
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Values the agent supplies: the app, the release's version, the host's inventory name and the
/// address the coordinator reaches it at.
pub const AGENT_VALUES: [&str; 4] = ["app", "version", "host", "address"];

/// Reads a template file, at most [`MAX_TEMPLATE_BYTES`] of it; `what` names it in errors.
pub fn read_template(path: &std::path::Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEMPLATE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| format!("template {what:?}: {e}"))?;
    if text.len() as u64 > MAX_TEMPLATE_BYTES {
        return Err(format!("template {what:?} is over {MAX_TEMPLATE_BYTES} bytes"));
    }
    Ok(text)
}

/// The placeholder names `template` uses, each with its line, in order; or what is malformed.
pub fn names(template: &str) -> Result<Vec<(&str, usize)>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    let mut line = 1;
    while let Some(start) = rest.find("{{") {
        line += rest[..start].matches('\n').count();
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(format!("line {line}: \"{{{{\" without a closing \"}}}}\""));
        };
        let name = after[..end].trim();
        let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(format!(
                "line {line}: {:?} is not a placeholder (write {{{{ name }}}})",
                &rest[start..start + 4 + end]
            ));
        }
        out.push((name, line));
        line += after[..end].matches('\n').count();
        rest = &after[end + 2..];
    }
    Ok(out)
}

/// Renders `template`, each placeholder replaced by `value(name)`; `env_file` escapes values for
/// the double quotes of a systemd `EnvironmentFile` (and refuses a value with a newline).
pub fn render(template: &str, value: impl Fn(&str) -> Option<String>, env_file: bool) -> Result<String, String> {
    let used = names(template)?;
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    for (name, line) in used {
        let start = rest.find("{{").unwrap_or(rest.len());
        let end = rest[start..].find("}}").map_or(rest.len(), |e| start + e + 2);
        out.push_str(&rest[..start]);
        let v = value(name).ok_or_else(|| format!("line {line}: no value for {{{{ {name} }}}}"))?;
        if env_file {
            if v.contains('\n') {
                return Err(format!(
                    "line {line}: the value of {{{{ {name} }}}} holds a newline, which an environment file cannot"
                ));
            }
            out.push_str(&v.replace('\\', "\\\\").replace('"', "\\\""));
        } else {
            out.push_str(&v);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks a secret's name: 1–128 of `[A-Za-z0-9_-]` (it names a file on the hosts).
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok { Ok(()) } else { Err(format!("{name:?} is not a secret name (1-128 of A-Z a-z 0-9 _ -)")) }
}

/// Checks a var's name: `env`, `vars.NAME`, or `labels:HOST:NAME` (host HOST's label NAME:
/// `{{ labels.NAME }}` on that host); NAME of `[A-Za-z0-9_-]`, HOST of `[A-Za-z0-9.-]`.
pub fn check_var_name(name: &str) -> Result<(), String> {
    let word = |n: &str| {
        !n.is_empty() && n.len() <= 128 && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    };
    let host = |h: &str| {
        !h.is_empty() && h.len() <= 253 && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    };
    let ok = name == "env"
        || name.strip_prefix("vars.").is_some_and(word)
        || name.strip_prefix("labels:").and_then(|r| r.split_once(':')).is_some_and(|(h, n)| host(h) && word(n));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a var name (env, vars.NAME or labels:HOST:NAME; NAME of A-Z a-z 0-9 _ -)"))
    }
}

/// The var holding host `host`'s label `name`.
pub fn label_var(host: &str, name: &str) -> String {
    format!("labels:{host}:{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(name: &str) -> Option<String> {
        match name {
            "host" => Some("web-1".into()),
            "vars.db" => Some("db \"prod\"\\1".into()),
            "vars.multi" => Some("a\nb".into()),
            _ => None,
        }
    }

    #[test]
    fn placeholders_are_filled_and_mistakes_are_named_with_their_line() {
        assert_eq!(
            render("host: {{host}}\ndb: {{ vars.db }}\n", values, false).as_deref(),
            Ok("host: web-1\ndb: db \"prod\"\\1\n")
        );
        assert_eq!(render("no placeholders", values, false).as_deref(), Ok("no placeholders"));
        assert_eq!(render("DB=\"{{ vars.db }}\"\n", values, true).as_deref(), Ok("DB=\"db \\\"prod\\\"\\\\1\"\n"));
        let e = render("a\nb {{ vars.dbb }}", values, false).expect_err("unknown");
        assert_eq!(e, "line 2: no value for {{ vars.dbb }}");
        assert!(render("x {{ host", values, false).expect_err("open").contains("line 1: \"{{\" without a closing"));
        assert!(render("{{ a b }}", values, false).expect_err("bad").contains("is not a placeholder"));
        assert!(render("M=\"{{ vars.multi }}\"", values, true).expect_err("newline").contains("holds a newline"));
        assert_eq!(names("{{ a }}\n\n{{b}}").expect("names"), [("a", 1), ("b", 3)]);
    }

    #[test]
    fn var_names() {
        for ok in ["env", "vars.db_host", "vars.A-1"] {
            assert!(check_var_name(ok).is_ok(), "{ok}");
        }
        assert!(check_var_name(&label_var("web-1.example", "zone")).is_ok());
        for bad in
            ["host", "vars.", "vars.a.b", "vars.a b", "secret", "labels:web-1", "labels::zone", "labels:a b:zone"]
        {
            assert!(check_var_name(bad).is_err(), "{bad}");
        }
    }
}
