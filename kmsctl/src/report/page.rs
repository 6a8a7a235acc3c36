//! The report's HTML: one document, inline CSS, plots as inline SVG, no script. A
//! Content-Security-Policy forbids loading anything, so a browser opening it offline shows
//! all of it, and a name in it (a key's, an identity's) is text, never markup.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use kms_client::api::{ApprovalStatus, BrakeSubject, KeyInfo, KeyState};

use super::{Report, Series, Usage, Window};

/// Plots per section at most (the busiest, by unwraps).
const MAX_PLOTS: usize = 20;

/// A key is flagged as due when its rotation falls within this.
const DUE_SOON: Duration = Duration::from_secs(7 * 86_400);

const STYLE: &str = "
body{font:14px/1.45 system-ui,'DejaVu Sans',sans-serif;margin:24px auto;max-width:1000px;color:#1d232a;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d5dbe1;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 2px}.meta{color:#56606b}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}.card{border:1px solid #d5dbe1;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:22px}.warn b{color:#b03a2e}
table{border-collapse:collapse;width:100%;margin:6px 0;overflow-wrap:anywhere}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e6eaee;vertical-align:top}
th{background:#f3f5f7;white-space:nowrap}.due{color:#b03a2e;font-weight:600}.missing{color:#b03a2e}
.legend span{display:inline-block;margin-right:16px}.sw{display:inline-block;width:22px;height:4px;vertical-align:middle;margin-right:6px}
svg{display:block;margin:2px 0 10px}
";

/// The colours of the two series (the browser test looks for them in the screenshot).
const UNWRAP_COLOUR: &str = "#c0392b";
const WRAP_COLOUR: &str = "#1f6fb2";

/// Text as HTML text or attribute value.
fn esc(s: &str) -> String {
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

/// `2026-12-05 17:00` (UTC).
fn minute(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.get(..16).unwrap_or(&s).replace('T', " ")
}

/// A plot's time label: `12-05 17:00` over days, `17:00` within one, `17:03:20` with
/// buckets of seconds.
fn tick(t: SystemTime, w: &Window) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    let range = if w.bucket.as_secs() < 60 {
        11..19
    } else if w.to.duration_since(w.from).unwrap_or_default().as_secs() <= 86_400 {
        11..16
    } else {
        5..16
    };
    s.get(range).unwrap_or(&s).replace('T', " ")
}

/// Whole days, hours, minutes or seconds.
fn age(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 86_400 => format!("{} d", s / 86_400),
        s if s >= 3600 => format!("{} h", s / 3600),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// 1, 2, 5 × 10ⁿ at or above `n`.
fn nice_ceiling(n: u64) -> u64 {
    let mut step = 1;
    loop {
        for m in [1, 2, 5] {
            if step * m >= n {
                return step * m;
            }
        }
        step *= 10;
    }
}

/// One plot: unwraps and wraps per bucket over the window.
fn plot(title: &str, s: &Series, w: &Window) -> String {
    const W: f64 = 900.0;
    const H: f64 = 170.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 10.0;
    const TOP: f64 = 10.0;
    const BOTTOM: f64 = 26.0;
    let max = s.unwraps.iter().chain(&s.wraps).copied().max().unwrap_or(0);
    let ymax = nice_ceiling(max.max(1));
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |i: usize| LEFT + pw * i as f64 / (w.points.max(2) - 1) as f64;
    let y = |v: u64| TOP + ph - ph * v as f64 / ymax as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<h3>{title}</h3><svg class="plot" role="img" aria-label="{title}: unwraps and wraps" width="{W}" height="{H}" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg">"#,
        title = esc(title)
    );
    for (v, label) in [
        (0, "0".to_owned()),
        (ymax / 2, (ymax / 2).to_string()),
        (ymax, ymax.to_string()),
    ] {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e1e5ea"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#56606b">{label}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            y = y(v),
        );
    }
    let ticks = 6.min(w.points);
    for k in 0..=ticks {
        let i = (w.points - 1) * k / ticks.max(1);
        let t = w.from + w.bucket * u32::try_from(i).unwrap_or(0);
        let anchor = match k {
            0 => "start",
            k if k == ticks => "end",
            _ => "middle",
        };
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="{anchor}" fill="#56606b">{}</text>"##,
            x(i),
            H - 8.0,
            esc(&tick(t, w))
        );
    }
    for (values, colour, class) in [
        (&s.wraps, WRAP_COLOUR, "wraps"),
        (&s.unwraps, UNWRAP_COLOUR, "unwraps"),
    ] {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline class="{class}" fill="none" stroke="{colour}" stroke-width="2.5" points="{}"/>"#,
            points.join(" ")
        );
    }
    let _ = write!(
        svg,
        r#"</svg><div class="meta">{} unwraps, {} wraps</div>"#,
        s.total_unwraps(),
        s.total_wraps()
    );
    svg
}

/// The busiest of `map`, by unwraps then wraps.
fn busiest(map: &std::collections::BTreeMap<String, Series>) -> (Vec<(&String, &Series)>, usize) {
    let mut all: Vec<_> = map.iter().collect();
    all.sort_by_key(|(name, s)| {
        (
            std::cmp::Reverse((s.total_unwraps(), s.total_wraps())),
            *name,
        )
    });
    let rest = all.len().saturating_sub(MAX_PLOTS);
    all.truncate(MAX_PLOTS);
    (all, rest)
}

fn missing(out: &mut String, what: &str, why: &str) {
    let _ = write!(
        out,
        r#"<p class="missing">{} not read: {}</p>"#,
        esc(what),
        esc(why)
    );
}

/// When `key`'s current version is due for rotation.
fn rotation_due(key: &KeyInfo, rotate_after: Duration) -> Option<SystemTime> {
    if key.state != KeyState::Enabled {
        return None;
    }
    let current = key
        .versions
        .iter()
        .find(|v| v.version == key.current_version)?;
    let created = humantime::parse_rfc3339(&current.created_at).ok()?;
    let period = match &key.rotation_period {
        Some(p) => humantime::parse_duration(p).ok()?,
        None => rotate_after,
    };
    Some(created + period)
}

fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    out.push_str("<table><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            // Cells are escaped by their makers (some carry a class).
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn keys_section(out: &mut String, r: &Report) -> usize {
    out.push_str("<h2 id=\"keys\">Keys, versions and rotation</h2>");
    let keys = match &r.keys {
        Ok(keys) => keys,
        Err(e) => {
            missing(out, "The keys", e);
            return 0;
        }
    };
    let now = r.window.to;
    let mut due = 0;
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let versions = k
                .versions
                .iter()
                .map(|v| {
                    let age = humantime::parse_rfc3339(&v.created_at)
                        .ok()
                        .and_then(|c| now.duration_since(c).ok())
                        .map_or_else(|| "?".into(), age);
                    let retired = if v.can_unwrap { "" } else { ", retired" };
                    format!("v{} ({age}{retired})", v.version)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let rotation = match rotation_due(k, r.rotate_after) {
                Some(at) if at <= now + DUE_SOON => {
                    due += 1;
                    format!(r#"<span class="due">due {}</span>"#, esc(&minute(at)))
                }
                Some(at) => esc(&minute(at)),
                None => "—".into(),
            };
            let (wraps, unwraps) = k
                .versions
                .iter()
                .fold((0, 0), |(w, u), v| (w + v.wraps, u + v.unwraps));
            vec![
                esc(&k.name),
                esc(&format!("{:?}", k.state).to_lowercase()),
                esc(&serde_json::to_value(k.algorithm).map_or_else(
                    |_| String::new(),
                    |v| v.as_str().unwrap_or_default().to_owned(),
                )),
                esc(&versions),
                esc(k.rotation_period.as_deref().unwrap_or("none")),
                rotation,
                wraps.to_string(),
                unwraps.to_string(),
            ]
        })
        .collect();
    table(
        out,
        &[
            "Key",
            "State",
            "Algorithm",
            "Versions (age)",
            "Rotation period",
            "Next rotation",
            "Wraps (all time)",
            "Unwraps (all time)",
        ],
        &rows,
    );
    let _ = write!(
        out,
        r#"<p class="meta">Keys without a rotation period are due {} after their current version was made; "due" marks a rotation within 7 days or past.</p>"#,
        age(r.rotate_after)
    );
    due
}

fn usage_section(out: &mut String, r: &Report) {
    out.push_str(r#"<h2 id="usage">Unwraps and wraps over time</h2><p class="legend">"#);
    let _ = write!(
        out,
        r#"<span><i class="sw" style="background:{UNWRAP_COLOUR}"></i>unwraps (DEKs handed back)</span><span><i class="sw" style="background:{WRAP_COLOUR}"></i>wraps (DEKs made or wrapped)</span> one point per {}</p>"#,
        humantime::format_duration(r.window.bucket)
    );
    let usage = match &r.usage {
        Ok(u) => u,
        Err(e) => {
            missing(out, "The audit trail", e);
            return;
        }
    };
    if usage.skipped > 0 {
        let _ = write!(
            out,
            r#"<p class="missing">The oldest {} records of the period were not read (--max-records): the plots start later than the period.</p>"#,
            usage.skipped
        );
    }
    out.push_str(&plot("Every key", &usage.all, &r.window));
    for (what, map, id) in [
        ("Per key", &usage.keys, "per-key"),
        ("Per identity", &usage.identities, "per-identity"),
    ] {
        let _ = write!(out, r#"<section id="{id}"><h2>{what}</h2>"#);
        let (shown, rest) = busiest(map);
        if shown.is_empty() {
            out.push_str("<p class=\"meta\">No use in the period.</p>");
        }
        for (name, s) in shown {
            out.push_str(&plot(name, s, &r.window));
        }
        if rest > 0 {
            let _ = write!(out, r#"<p class="meta">{rest} more with less use.</p>"#);
        }
        out.push_str("</section>");
    }
}

fn controls_section(out: &mut String, r: &Report) {
    out.push_str(r#"<h2 id="approvals">Pending approvals</h2>"#);
    match &r.approvals {
        Err(e) => missing(out, "The approvals", e),
        Ok(list) => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .filter(|a| matches!(a.status, ApprovalStatus::Pending | ApprovalStatus::Approved))
                .map(|a| {
                    vec![
                        esc(&a.id),
                        esc(a.operation.as_str()),
                        esc(&format!("{} {}", a.action.method, a.action.path)),
                        esc(&a.requested_by),
                        esc(&format!("{:?}", a.status).to_lowercase()),
                        format!("{}/{}", a.approvals.len(), a.required),
                        esc(&a.expires_at),
                    ]
                })
                .collect();
            if rows.is_empty() {
                out.push_str("<p class=\"meta\">None.</p>");
            } else {
                table(
                    out,
                    &[
                        "ID",
                        "Operation",
                        "Action",
                        "Requested by",
                        "Status",
                        "Approvals",
                        "Expires",
                    ],
                    &rows,
                );
            }
        }
    }
    out.push_str(r#"<h2 id="brake">Exfiltration brake</h2>"#);
    match &r.brake {
        Err(e) => missing(out, "The brake", e),
        Ok(b) => {
            let _ = write!(
                out,
                "<p>Mode <b>{}</b>, action <b>{}</b>, {} hold(s) on the node that answered.</p>",
                esc(&b.mode),
                esc(&b.action),
                b.holds.len()
            );
            let rows: Vec<Vec<String>> = b
                .holds
                .iter()
                .map(|h| {
                    let kind = match h.kind {
                        BrakeSubject::Identity => "identity",
                        BrakeSubject::Key => "key",
                    };
                    vec![
                        kind.into(),
                        esc(&h.tenant),
                        esc(&h.name),
                        age(Duration::from_secs(h.held_secs)),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                table(out, &["On", "Tenant", "Name", "Held for"], &rows);
            }
        }
    }
}

fn events_section(out: &mut String, usage: &Usage) {
    out.push_str(r#"<h2 id="events">Recent security events</h2><p class="meta">From the audit trail: refusals (401, 403, 429) and changes to keys' lifecycle, grants, approvals and the service, newest first. (Alerts themselves go to the alert webhook or command; these are the records of what raises most of them.)</p>"#);
    if usage.events.is_empty() {
        out.push_str("<p class=\"meta\">None in the period.</p>");
        return;
    }
    let rows: Vec<Vec<String>> = usage
        .events
        .iter()
        .rev()
        .map(|e| {
            vec![
                esc(&e.time),
                esc(e.identity.as_deref().unwrap_or("—")),
                esc(&e.operation),
                esc(e.key.as_deref().unwrap_or("")),
                esc(&e.outcome),
                e.status.to_string(),
            ]
        })
        .collect();
    table(
        out,
        &["Time", "Identity", "Operation", "Key", "Outcome", "Status"],
        &rows,
    );
}

fn card(out: &mut String, label: &str, value: &str, warn: bool) {
    let class = if warn { "card warn" } else { "card" };
    let _ = write!(
        out,
        r#"<div class="{class}"><b>{}</b>{}</div>"#,
        esc(value),
        esc(label)
    );
}

/// The document.
pub(super) fn render(r: &Report) -> String {
    let mut body = String::new();
    let due = keys_section(&mut body, r);
    let mut head = String::new();
    let _ = write!(
        head,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'"><meta name="viewport" content="width=device-width, initial-scale=1"><title>Keyhold usage report</title><style>{STYLE}</style></head><body><h1>Keyhold usage report</h1><p class="meta">{} — from {} to {} UTC. No key material: built from key metadata, usage counts and audit records.</p><div class="cards">"#,
        esc(&r.endpoint),
        esc(&minute(r.window.from)),
        esc(&minute(r.window.to)),
    );
    let count = |n: Result<usize, &String>| n.map_or_else(|_| "?".to_owned(), |n| n.to_string());
    card(
        &mut head,
        "keys",
        &count(r.keys.as_ref().map(Vec::len)),
        false,
    );
    if let Ok(u) = &r.usage {
        card(
            &mut head,
            "unwraps",
            &u.all.total_unwraps().to_string(),
            false,
        );
        card(&mut head, "wraps", &u.all.total_wraps().to_string(), false);
        card(
            &mut head,
            "security events",
            &u.events.len().to_string(),
            false,
        );
    }
    card(&mut head, "due for rotation", &due.to_string(), due > 0);
    let pending = r.approvals.as_ref().map(|l| {
        l.iter()
            .filter(|a| matches!(a.status, ApprovalStatus::Pending | ApprovalStatus::Approved))
            .count()
    });
    card(
        &mut head,
        "pending approvals",
        &count(pending),
        pending.is_ok_and(|n| n > 0),
    );
    let holds = r.brake.as_ref().map(|b| b.holds.len());
    card(
        &mut head,
        "brake holds",
        &count(holds),
        holds.is_ok_and(|n| n > 0),
    );
    head.push_str("</div>");
    usage_section(&mut body, r);
    controls_section(&mut body, r);
    if let Ok(u) = &r.usage {
        events_section(&mut body, u);
    }
    head.push_str(&body);
    head.push_str("</body></html>\n");
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(keys: Vec<KeyInfo>) -> Report {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let window = Window::last(Duration::from_secs(86_400), now);
        let mut usage = Usage::new(&window);
        let mut s = Series::new(window.points);
        s.unwraps[3] = 7;
        usage.keys.insert("t/<script>alert(1)</script>".into(), s);
        Report {
            endpoint: "https://kms.example:8443".into(),
            window,
            rotate_after: Duration::from_secs(365 * 86_400),
            keys: Ok(keys),
            usage: Ok(usage),
            approvals: Err("needs the admin role".into()),
            brake: Err("sealed".into()),
        }
    }

    #[test]
    fn names_are_text_and_nothing_is_fetched() {
        let html = report(Vec::new()).html();
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("t/&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("default-src 'none'"));
        for fetch in ["src=", "href=", "@import", "url("] {
            assert!(!html.contains(fetch), "{fetch}");
        }
        assert!(html.contains("The approvals not read: needs the admin role"));
        assert_eq!(html.matches("<svg").count(), 2);
    }

    #[test]
    fn ceilings_are_round() {
        assert_eq!(
            [1, 3, 7, 11, 99, 101, 4000].map(nice_ceiling),
            [1, 5, 10, 20, 100, 200, 5000]
        );
    }
}
