//! HTML from the internet, made safe to show agents; plus plain-text conversions for previews
//! and for text-only bodies.
//!
//! ammonia does the sanitising (an allow-list over a real HTML5 parser). Mail needs a few
//! adjustments to its defaults: inline images arrive as `cid:` URLs, some clients inline images
//! as `data:` URLs, remote images are tracking pixels more often than not and are dropped unless
//! the caller opts in, and every link opens in a new tab without leaking the referrer.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

/// What the sanitiser lets through beyond the safe defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SanitizeOptions {
    /// Keep `http(s)` image sources. Off by default: loading them tells the sender when and
    /// where the mail was read.
    pub allow_remote_images: bool,
}

/// A configured sanitiser; build once and share (it is `Send + Sync`).
pub struct HtmlSanitizer {
    builder: ammonia::Builder<'static>,
}

impl std::fmt::Debug for HtmlSanitizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HtmlSanitizer").finish_non_exhaustive()
    }
}

const TAGS: &[&str] = &[
    "a",
    "abbr",
    "address",
    "b",
    "bdi",
    "bdo",
    "blockquote",
    "br",
    "caption",
    "center",
    "cite",
    "code",
    "col",
    "colgroup",
    "dd",
    "del",
    "div",
    "dl",
    "dt",
    "em",
    "font",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "i",
    "img",
    "ins",
    "kbd",
    "li",
    "mark",
    "ol",
    "p",
    "pre",
    "q",
    "s",
    "samp",
    "small",
    "span",
    "strike",
    "strong",
    "sub",
    "sup",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "tr",
    "tt",
    "u",
    "ul",
    "wbr",
];

/// Layout and typography only. Anything that can position content over the UI (`position`),
/// fetch a URL (`background`, `background-image`, `list-style-image`) or run code is absent.
const STYLE_PROPERTIES: &[&str] = &[
    "color",
    "background-color",
    "font",
    "font-family",
    "font-size",
    "font-style",
    "font-weight",
    "text-align",
    "text-decoration",
    "text-indent",
    "text-transform",
    "line-height",
    "letter-spacing",
    "white-space",
    "vertical-align",
    "direction",
    "margin",
    "margin-top",
    "margin-right",
    "margin-bottom",
    "margin-left",
    "padding",
    "padding-top",
    "padding-right",
    "padding-bottom",
    "padding-left",
    "border",
    "border-top",
    "border-right",
    "border-bottom",
    "border-left",
    "border-color",
    "border-style",
    "border-width",
    "border-collapse",
    "border-spacing",
    "border-radius",
    "width",
    "height",
    "max-width",
    "min-width",
    "list-style-type",
    "display",
];

/// Image types a browser renders without running anything. SVG is excluded: it is a document
/// format and can carry script.
const DATA_IMAGE_TYPES: &[&str] = &[
    "data:image/png",
    "data:image/gif",
    "data:image/jpeg",
    "data:image/jpg",
    "data:image/webp",
    "data:image/bmp",
];

impl HtmlSanitizer {
    #[must_use]
    pub fn new(options: SanitizeOptions) -> Self {
        let mut tag_attributes: HashMap<&'static str, HashSet<&'static str>> = HashMap::new();
        tag_attributes.insert("a", HashSet::from(["href", "name"]));
        tag_attributes.insert(
            "img",
            HashSet::from(["src", "alt", "width", "height", "align"]),
        );
        tag_attributes.insert("font", HashSet::from(["color", "face", "size"]));
        tag_attributes.insert("ol", HashSet::from(["start", "type"]));
        tag_attributes.insert("blockquote", HashSet::from(["type"]));
        for cell in ["td", "th"] {
            tag_attributes.insert(
                cell,
                HashSet::from([
                    "colspan", "rowspan", "align", "valign", "width", "height", "bgcolor",
                ]),
            );
        }
        tag_attributes.insert(
            "table",
            HashSet::from([
                "border",
                "cellpadding",
                "cellspacing",
                "width",
                "align",
                "bgcolor",
            ]),
        );
        for t in ["tr", "tbody", "thead", "tfoot"] {
            tag_attributes.insert(t, HashSet::from(["align", "valign", "bgcolor"]));
        }
        for t in ["col", "colgroup"] {
            tag_attributes.insert(t, HashSet::from(["span", "width", "align"]));
        }
        for t in ["p", "div", "h1", "h2", "h3", "h4", "h5", "h6"] {
            tag_attributes.insert(t, HashSet::from(["align"]));
        }
        tag_attributes.insert("hr", HashSet::from(["width", "size", "align"]));

        let allow_remote_images = options.allow_remote_images;
        let mut builder = ammonia::Builder::default();
        builder
            .tags(TAGS.iter().copied().collect())
            // Content of these is never shown, not even as text: a <title> or a stylesheet
            // leaking into the body reads as garbage.
            .clean_content_tags(HashSet::from([
                "script", "style", "title", "head", "noscript", "template", "xml", "object",
                "iframe", "frameset", "frame", "applet", "embed", "svg", "math", "select",
                "textarea", "button",
            ]))
            .tag_attributes(tag_attributes)
            .generic_attributes(HashSet::from(["style", "dir", "lang", "title"]))
            .filter_style_properties(STYLE_PROPERTIES.iter().copied().collect())
            .url_schemes(HashSet::from([
                "http", "https", "mailto", "tel", "cid", "data",
            ]))
            // A mail has no base URL: a relative link can only resolve against our own UI.
            .url_relative(ammonia::UrlRelative::Deny)
            .link_rel(Some("noopener noreferrer nofollow"))
            .set_tag_attribute_value("a", "target", "_blank")
            .attribute_filter(move |element, attribute, value| {
                filter_url(element, attribute, value, allow_remote_images)
            });
        Self { builder }
    }

    /// Sanitised HTML, safe to embed in the agent UI.
    #[must_use]
    pub fn clean(&self, html: &str) -> String {
        self.builder.clean(html).to_string()
    }
}

/// Per-attribute URL policy on top of the scheme allow-list: `data:` and `cid:` are only
/// meaningful (and only safe) as image sources.
fn filter_url<'u>(
    element: &str,
    attribute: &str,
    value: &'u str,
    allow_remote_images: bool,
) -> Option<std::borrow::Cow<'u, str>> {
    let lower = value.trim_start().to_ascii_lowercase();
    let scheme = lower.split_once(':').map(|(s, _)| s);
    match (element, attribute) {
        ("img", "src") => {
            let keep = match scheme {
                Some("cid") => true,
                Some("data") => DATA_IMAGE_TYPES
                    .iter()
                    .any(|t| lower.starts_with(t) && lower[t.len()..].starts_with([';', ','])),
                Some("http" | "https") => allow_remote_images,
                _ => lower.starts_with("//") && allow_remote_images,
            };
            keep.then(|| value.into())
        }
        ("a", "href") => match scheme {
            Some("data" | "cid") => None,
            _ => Some(value.into()),
        },
        _ => Some(value.into()),
    }
}

static DEFAULT_SANITIZER: LazyLock<HtmlSanitizer> =
    LazyLock::new(|| HtmlSanitizer::new(SanitizeOptions::default()));

/// [`HtmlSanitizer::clean`] with the default options (remote images dropped).
#[must_use]
pub fn sanitize_html(html: &str) -> String {
    DEFAULT_SANITIZER.clean(html)
}

/// Tags that start a new line in the text rendering.
const BLOCK_TAGS: &[&str] = &[
    "address",
    "blockquote",
    "caption",
    "center",
    "dd",
    "div",
    "dl",
    "dt",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "ol",
    "p",
    "pre",
    "table",
    "tr",
    "ul",
];

/// Reduces any HTML to a tag-free canonical form that a trivial scanner can read: only a few
/// structural tags, no attributes, and entities limited to what html5ever's serializer emits.
static TEXT_SKELETON: LazyLock<ammonia::Builder<'static>> = LazyLock::new(|| {
    let mut tags: HashSet<&'static str> = BLOCK_TAGS.iter().copied().collect();
    tags.extend(["br", "li", "td", "th"]);
    let mut b = ammonia::Builder::empty();
    b.tags(tags).clean_content_tags(HashSet::from([
        "script", "style", "title", "head", "noscript", "template", "xml",
    ]));
    b
});

/// A plain-text rendering for previews and text fallbacks: block elements and `<br>` become line
/// breaks, list items get a dash, table cells a tab, whitespace is collapsed as a browser would.
#[must_use]
pub fn html_to_text(html: &str) -> String {
    let skeleton = TEXT_SKELETON.clean(html).to_string();
    let mut out = String::with_capacity(skeleton.len());
    let mut rest = skeleton.as_str();
    let mut pre_depth = 0usize;
    while !rest.is_empty() {
        if let Some(after_lt) = rest.strip_prefix('<') {
            // The skeleton only holds tags we allowed, serialized as <name> or </name>.
            let end = after_lt.find('>').map_or(after_lt.len(), |i| i + 1);
            let tag = &after_lt[..end.saturating_sub(1)];
            rest = after_lt.get(end..).unwrap_or("");
            let (closing, name) = tag.strip_prefix('/').map_or((false, tag), |n| (true, n));
            match (name, closing) {
                ("br", _) => out.push('\n'),
                ("li", false) => {
                    newline(&mut out);
                    out.push_str("- ");
                }
                ("td" | "th", false) if !out.ends_with(['\n', '\t']) && !out.is_empty() => {
                    out.push('\t');
                }
                ("pre", false) => {
                    pre_depth += 1;
                    newline(&mut out);
                }
                ("pre", true) => {
                    pre_depth = pre_depth.saturating_sub(1);
                    newline(&mut out);
                }
                (n, _) if BLOCK_TAGS.contains(&n) || n == "li" => newline(&mut out),
                _ => {}
            }
            continue;
        }
        let end = rest.find('<').unwrap_or(rest.len());
        let text = decode_entities(&rest[..end]);
        rest = &rest[end..];
        if pre_depth > 0 {
            out.push_str(&text);
            continue;
        }
        for (i, word) in text.split(is_html_space).enumerate() {
            if i > 0 && !out.ends_with([' ', '\n', '\t']) && !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    tidy_lines(&out)
}

fn is_html_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c')
}

fn newline(out: &mut String) {
    while out.ends_with([' ', '\t']) {
        out.pop();
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
}

/// Trims line ends and allows at most one blank line in a row.
fn tidy_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim_end().to_owned()
}

/// The serializer only emits these (text nodes escape `&`, `<`, `>` and no-break space).
fn decode_entities(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// `text` as at most `max_chars` characters on one line, cut at a word boundary when possible,
/// with an ellipsis when cut. For list views (Graph's own bodyPreview is 255 characters).
#[must_use]
pub fn preview(text: &str, max_chars: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max_chars {
        return flat;
    }
    let cut: String = flat.chars().take(max_chars.saturating_sub(1)).collect();
    let cut = match cut.rfind(' ') {
        Some(i) if i > cut.len() / 2 => &cut[..i],
        _ => cut.as_str(),
    };
    format!("{}…", cut.trim_end())
}

/// A text body as HTML: escaped, line breaks as `<br>`, runs of spaces kept visible.
#[must_use]
pub fn text_to_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut prev_space = false;
    for c in normalized.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("<br>\n"),
            // Alternate spaces with no-break spaces so indentation in plain text survives.
            ' ' if prev_space => out.push_str("&nbsp;"),
            _ => out.push(c),
        }
        prev_space = c == ' ' && !prev_space;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_styles_frames_forms_and_handlers_are_removed() {
        let dirty = r#"<p onclick="steal()">Hi<script>alert(1)</script></p>
            <style>p{color:red}</style><iframe src="https://evil.example"></iframe>
            <form action="https://evil.example"><input name=x><button>Go</button></form>
            <a href="javascript:alert(1)">x</a><img src=x onerror=alert(1)>"#;
        let clean = sanitize_html(dirty);
        for bad in [
            "script",
            "alert",
            "onclick",
            "<style",
            "color:red",
            "iframe",
            "form",
            "input",
            "button",
            "javascript",
            "onerror",
        ] {
            assert!(!clean.contains(bad), "{bad} survived in {clean}");
        }
        assert!(clean.contains("<p>Hi</p>"), "{clean}");
    }

    #[test]
    fn links_open_in_a_new_tab_without_referrer() {
        let clean = sanitize_html(r#"<a href="https://example.com/x">x</a>"#);
        assert!(clean.contains(r#"href="https://example.com/x""#), "{clean}");
        assert!(
            clean.contains(r#"rel="noopener noreferrer nofollow""#),
            "{clean}"
        );
        assert!(clean.contains(r#"target="_blank""#), "{clean}");
        let relative = sanitize_html(r#"<a href="/admin">x</a>"#);
        assert!(!relative.contains("href"), "{relative}");
        let data = sanitize_html(r#"<a href="data:text/html,<script>x</script>">x</a>"#);
        assert!(!data.contains("href"), "{data}");
    }

    #[test]
    fn inline_cid_and_data_images_kept_remote_dropped_by_default() {
        let html = r#"<img src="cid:image001.png@01D9" alt="logo"><img src="data:image/png;base64,iVBORw0KGgo="><img src="https://tracker.example/p.gif"><img src="data:image/svg+xml;base64,PHN2Zz4="><img src="//tracker.example/p.gif">"#;
        let clean = sanitize_html(html);
        assert!(clean.contains(r#"src="cid:image001.png@01D9""#), "{clean}");
        assert!(
            clean.contains(r#"src="data:image/png;base64,iVBORw0KGgo=""#),
            "{clean}"
        );
        assert!(!clean.contains("tracker.example"), "{clean}");
        assert!(!clean.contains("svg"), "{clean}");

        let permissive = HtmlSanitizer::new(SanitizeOptions {
            allow_remote_images: true,
        });
        let clean = permissive.clean(html);
        assert!(
            clean.contains(r#"src="https://tracker.example/p.gif""#),
            "{clean}"
        );
        assert!(!clean.contains("svg"), "{clean}");
    }

    #[test]
    fn formatting_tables_and_safe_styles_survive() {
        let html = r#"<table border="1" cellpadding="2"><tr><td colspan="2" style="color: red; position: fixed; background-image: url(https://t.example/x)"><b>Total</b></td></tr></table><ul><li><i>a</i></li></ul><blockquote type="cite">q</blockquote><font color="blue">f</font>"#;
        let clean = sanitize_html(html);
        for kept in [
            r#"<table border="1" cellpadding="2">"#,
            r#"colspan="2""#,
            "color:red",
            "<b>Total</b>",
            "<li><i>a</i></li>",
            r#"<blockquote type="cite">"#,
            r#"<font color="blue">"#,
        ] {
            assert!(clean.contains(kept), "{kept} missing from {clean}");
        }
        assert!(!clean.contains("position"), "{clean}");
        assert!(!clean.contains("t.example"), "{clean}");
    }

    #[test]
    fn html_to_text_keeps_structure_and_drops_hidden_content() {
        let html = "<html><head><title>T</title><style>p{}</style></head><body>\
            <p>Hello&nbsp;<b>Alice</b>,</p><p>line one<br>line   two</p>\
            <ul><li>first</li><li>second</li></ul>\
            <table><tr><td>a</td><td>b</td></tr></table>\
            <p>5 &lt; 6 &amp;&amp; done</p><script>var x;</script></body></html>";
        assert_eq!(
            html_to_text(html),
            "Hello\u{a0}Alice,\nline one\nline two\n- first\n- second\na\tb\n5 < 6 && done"
        );
    }

    #[test]
    fn html_to_text_is_robust_on_broken_input() {
        assert_eq!(html_to_text("<p>unclosed <b>bold <i>x"), "unclosed bold x");
        assert_eq!(html_to_text("plain text only"), "plain text only");
        assert_eq!(html_to_text(""), "");
        assert_eq!(html_to_text("<pre>a\n  b</pre>"), "a\n  b");
    }

    #[test]
    fn preview_cuts_at_words() {
        assert_eq!(preview("short  text\n", 20), "short text");
        assert_eq!(preview("one two three four five", 12), "one two…");
        assert_eq!(preview("αβγδεζηθ", 4).chars().count(), 4);
    }

    #[test]
    fn text_to_html_escapes_and_breaks_lines() {
        assert_eq!(
            text_to_html("a < b & \"c\"\r\nnext  line"),
            "a &lt; b &amp; &quot;c&quot;<br>\nnext &nbsp;line"
        );
        assert_eq!(text_to_html("<script>"), "&lt;script&gt;");
        assert_eq!(sanitize_html(&text_to_html("x\ny")), "x<br>\ny");
    }
}
