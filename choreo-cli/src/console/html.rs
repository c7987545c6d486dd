//! The console's HTML: escaping, the page around every view, and the
//! small pieces views share (a state word, a time, a table).

use std::fmt::Write as _;

/// `s` safe inside an element or a quoted attribute.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as one component of a URL's query.
pub(crate) fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

const NAV: [(&str, &str); 5] = [
    ("/", "System"),
    ("/graph", "Graph"),
    ("/flow", "Flows"),
    ("/dlq", "Dead letters"),
    ("/events", "Aggregates"),
];

/// A whole page: the navigation (with `active` marked), then `body`. With
/// `live`, the page's script listens to that server-sent event stream and
/// swaps in the parts each event carries.
pub(crate) fn page(title: &str, active: &str, live: Option<&str>, body: &str) -> String {
    let mut nav = String::new();
    for (href, name) in NAV {
        let current = if href == active {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(nav, "<li><a href=\"{href}\"{current}>{name}</a></li>");
    }
    let live = live.map_or_else(String::new, |l| format!(" data-live=\"{}\"", esc(l)));
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · choreo console</title>\
         <link rel=\"stylesheet\" href=\"/assets/console.css\">\
         <script src=\"/assets/console.js\" defer></script></head>\
         <body{live}><a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header><span class=\"brand\">choreo console</span><nav aria-label=\"Views\"><ul>{nav}\
         <li><a href=\"/actions\"{a}>Actions</a></li></ul></nav></header>\
         <main id=\"main\">{body}</main></body></html>\n",
        t = esc(title),
        a = if active == "/actions" {
            " aria-current=\"page\""
        } else {
            ""
        },
    )
}

/// A state as a word with its colour class: readable without the colour.
pub(crate) fn state(word: &str) -> String {
    format!(
        "<span class=\"state st-{}\">{}</span>",
        word.to_ascii_lowercase(),
        esc(word)
    )
}

/// A Unix ms time as RFC 3339 to the second, in a `<time>`.
pub(crate) fn time_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let text = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string());
    format!("<time datetime=\"{text}\">{text}</time>")
}

/// A table: `head` are the column names; each row's cells are HTML
/// already. `id` names its body, which live updates replace.
pub(crate) fn table(
    caption: &str,
    head: &[&str],
    rows: &[Vec<String>],
    id: Option<&str>,
) -> String {
    table_around(caption, head, id, &rows_html(rows))
}

/// A table around `body`, its rows as HTML already.
pub(crate) fn table_around(caption: &str, head: &[&str], id: Option<&str>, body: &str) -> String {
    let mut out = format!("<table><caption>{}</caption><thead><tr>", esc(caption));
    for h in head {
        let _ = write!(out, "<th scope=\"col\">{h}</th>");
    }
    out.push_str("</tr></thead>");
    match id {
        Some(id) => {
            let _ = write!(out, "<tbody id=\"{id}\">");
        }
        None => out.push_str("<tbody>"),
    }
    out.push_str(body);
    out.push_str("</tbody></table>");
    out
}

/// Table rows (cells are HTML already).
pub(crate) fn rows_html(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{c}</td>");
        }
        out.push_str("</tr>");
    }
    out
}

/// JSON, pretty, escaped, in a `<pre>`.
pub(crate) fn json(v: &serde_json::Value) -> String {
    format!(
        "<pre class=\"json\">{}</pre>",
        esc(&serde_json::to_string_pretty(v).unwrap_or_default())
    )
}

#[cfg(test)]
mod tests {
    use super::{esc, url};

    #[test]
    fn escapes_what_html_and_urls_would_read() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(url("orders.o-1.>"), "orders.o-1.%3E");
        assert_eq!(url("a b&c"), "a%20b%26c");
    }
}
