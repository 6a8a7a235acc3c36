//! The exfiltration brake's figures (issue 28, RELIABILITY.md "Exfiltration brake"): two
//! weeks of generated, realistic diurnal traffic replayed through the brake's own code
//! (`kms_server::access::brake::Brake::charge_at`, on a simulated clock), with bulk
//! unwraps by thieves injected in the second week.
//!
//! - **False alarms**: every breach raised by the ordinary traffic (the brake runs in
//!   `enforce` with `hold`; a false hold is counted, then released at once, as an operator
//!   would, and the replay goes on).
//! - **DEKs before the hold**: at each attack, a thief with one identity's certificate
//!   unwraps that identity's DEKs at `--rate` per second (the server's full speed, measured
//!   beside it by `benches/brake.sh`) until refused; how many it got, and in how many
//!   seconds of its own traffic. Then the operator releases the identity and its keys
//!   (their current minute and hour start again) and the replay goes on.
//!
//! The traffic (seeded, so a run is repeatable):
//! - `--identities` applications, each with a daily peak drawn log-uniformly from 0.2 to
//!   40 unwraps a second, in one of four time zones (UTC, UTC+1, UTC+9, UTC−5); a bell over
//!   the working day peaking at 14:00 local, 8 % of the peak at night, weekends at 35 %,
//!   each day × 0.85–1.2 and each minute × 0.8–1.2; Poisson arrivals each second.
//! - Bursts: in 3 % of an application's hours, 2 to 15 minutes at 1.5–2.5× its rate.
//! - One application in six also runs a nightly batch at 02:00 local (30–50 minutes at
//!   20–150 a second); one runs a weekly report on Mondays at 06:00 UTC (20 minutes at 40 a
//!   second), seen once while learning.
//! - Each application uses one to three of `--keys` keys; each unwrap's context is one of
//!   200 000 records, skewed towards recent ones.
//!
//! The brake's settings are the `[brake]` table of `--config` (default: the deployment
//! example, `deploy/kms-server.toml`), with `mode = "enforce"` and `action = "hold"`.
//!
//! Usage: `cargo run --release -p keyhold-benches --bin brake_replay -- --rate 9000`

use std::sync::{Arc, Mutex};

use clap::Parser;
use kms_server::access::brake::{Action, Brake, BrakeSettings, Cause, Mode, Moment, Subject};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// The thief's unwraps per second (the server's full speed).
    #[arg(long)]
    rate: f64,
    /// The configuration whose `[brake]` table is replayed.
    #[arg(long, default_value = "deploy/kms-server.toml")]
    config: std::path::PathBuf,
    /// Applications (identities).
    #[arg(long, default_value_t = 24)]
    identities: usize,
    /// Keys.
    #[arg(long, default_value_t = 8)]
    keys: usize,
    /// Days replayed (the first `learn_days` learn).
    #[arg(long, default_value_t = 14)]
    days: u64,
    /// Attacks in the days after the first week.
    #[arg(long, default_value_t = 60)]
    attacks: usize,
    /// Seed.
    #[arg(long, default_value_t = 28)]
    seed: u64,
    /// Replaces the baseline's `factor` (to compare settings).
    #[arg(long)]
    factor: Option<f64>,
}

/// Monday 2026-11-02 00:00 UTC.
const START: u64 = 1_793_577_600;
const DAY: u64 = 86_400;

struct App {
    name: String,
    peak: f64,
    tz: i64,
    keys: Vec<String>,
    nightly: Option<(f64, u64)>,
    weekly: bool,
    /// This day's factor, and the burst in progress: (until second, factor).
    day_factor: f64,
    minute_factor: f64,
    burst: Option<(u64, f64)>,
}

impl App {
    /// Mean unwraps a second at simulated second `t`.
    fn rate(&self, t: u64) -> f64 {
        let local = t as i64 + self.tz * 3600;
        let hour = (local.rem_euclid(DAY as i64)) as f64 / 3600.0;
        let weekday = (local.div_euclid(DAY as i64)).rem_euclid(7); // 0 = Monday
        let bell = 0.08 + 0.92 * (-(hour - 14.0).powi(2) / (2.0 * 3.2 * 3.2)).exp();
        let weekend = if weekday >= 5 { 0.35 } else { 1.0 };
        let mut r = self.peak * bell * weekend * self.day_factor * self.minute_factor;
        if let Some((rate, minutes)) = self.nightly {
            let since = local.rem_euclid(DAY as i64) - 2 * 3600;
            if (0..(minutes * 60) as i64).contains(&since) {
                r += rate;
            }
        }
        let utc_week = t % (7 * DAY);
        if self.weekly && (6 * 3600..6 * 3600 + 1200).contains(&utc_week) {
            r += 40.0;
        }
        if let Some((until, f)) = self.burst {
            if t < until {
                r *= f;
            }
        }
        r
    }
}

fn poisson(rng: &mut StdRng, lambda: f64) -> u64 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda < 30.0 {
        let (limit, mut p, mut k) = ((-lambda).exp(), 1.0, 0);
        loop {
            p *= rng.gen::<f64>();
            if p <= limit {
                return k;
            }
            k += 1;
        }
    }
    let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(1e-12), rng.gen());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (lambda + lambda.sqrt() * z).round().max(0.0) as u64
}

fn context(app: usize, rng: &mut StdRng) -> [u8; 16] {
    let record = (200_000.0 * rng.gen::<f64>().powi(3)) as u64;
    let mut c = [0; 16];
    c[..8].copy_from_slice(&(app as u64).to_le_bytes());
    c[8..].copy_from_slice(&record.to_le_bytes());
    c
}

fn settings(path: &std::path::Path) -> anyhow::Result<BrakeSettings> {
    let text = std::fs::read_to_string(path)?;
    let table: toml::Table = toml::from_str(&text)?;
    let brake = table
        .get("brake")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{}: no [brake] table", path.display()))?;
    let mut s: BrakeSettings = brake.try_into()?;
    s.mode = Mode::Enforce;
    s.action = Action::Hold;
    s.check().map_err(anyhow::Error::msg)?;
    Ok(s)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut settings = settings(&args.config)?;
    if let (Some(f), Some(b)) = (args.factor, settings.baseline.as_mut()) {
        b.factor = f;
    }
    println!("brake: {settings:?}");
    let learn = settings
        .baseline
        .as_ref()
        .map_or(0, |b| u64::from(b.learn_days));
    let breaches: Arc<Mutex<Vec<(Subject, Cause)>>> = Arc::default();
    let seen = breaches.clone();
    let brake = Brake::new(settings, move |b| {
        seen.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((b.subject.clone(), b.cause));
    })
    .ok_or_else(|| anyhow::anyhow!("the brake is off"))?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let keys: Vec<String> = (0..args.keys).map(|k| format!("key-{k}")).collect();
    let mut apps: Vec<App> = (0..args.identities)
        .map(|i| App {
            name: format!("spiffe://provider.example/app-{i}"),
            peak: 0.2 * 200f64.powf(rng.gen::<f64>()),
            tz: [0, 1, 9, -5][i % 4],
            keys: (0..rng.gen_range(1..=3))
                .map(|_| keys[rng.gen_range(0..keys.len())].clone())
                .collect(),
            nightly: (i % 6 == 5).then(|| (rng.gen_range(20.0..150.0), rng.gen_range(30..=50))),
            weekly: i == 0,
            day_factor: 1.0,
            minute_factor: 1.0,
            burst: None,
        })
        .collect();
    let mut attacks: Vec<(u64, usize)> = (0..args.attacks)
        .map(|_| {
            let t = rng.gen_range(learn.max(7) * DAY..args.days * DAY);
            (t, rng.gen_range(0..apps.len()))
        })
        .collect();
    attacks.sort_unstable();
    let mut next_attack = 0;
    let (mut unwraps, mut false_alarms, mut refused) = (0_u64, Vec::new(), 0_u64);
    let mut got = Vec::new();
    for t in 0..args.days * DAY {
        if t % DAY == 0 {
            for a in &mut apps {
                a.day_factor = rng.gen_range(0.85..1.2);
            }
        }
        if t % 3600 == 0 {
            for a in &mut apps {
                if rng.gen::<f64>() < 0.03 {
                    let start = t + rng.gen_range(0..3000);
                    a.burst = Some((start + rng.gen_range(120..900), rng.gen_range(1.5..2.5)));
                }
            }
        }
        let minute_noise = t % 60 == 0;
        for (i, a) in apps.iter_mut().enumerate() {
            if minute_noise {
                a.minute_factor = rng.gen_range(0.8..1.2);
            }
            let n = poisson(&mut rng, a.rate(t));
            for j in 0..n {
                let key = &a.keys[rng.gen_range(0..a.keys.len())];
                let ctx = context(i, &mut rng);
                let now = Moment {
                    mono: t as f64 + j as f64 / n as f64,
                    wall: START + t,
                };
                unwraps += 1;
                if brake.charge_at("t", &a.name, key, Some(&ctx), now).is_err() {
                    refused += 1;
                }
            }
        }
        // Breaches of ordinary traffic are false alarms: counted (once per subject and
        // hour), then released.
        let legit: Vec<_> = std::mem::take(
            &mut *breaches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (subject, cause) in legit {
            let hour = t / 3600;
            if !false_alarms
                .iter()
                .any(|(at, s, _): &(u64, Subject, Cause)| at / 3600 == hour && *s == subject)
            {
                false_alarms.push((t, subject.clone(), cause));
            }
            brake.release(&subject);
        }
        while next_attack < attacks.len() && attacks[next_attack].0 == t {
            let victim = &apps[attacks[next_attack].1];
            let mut n = 0_u64;
            let limit = (args.rate * 10.0) as u64;
            while n < limit {
                let key = &victim.keys[rng.gen_range(0..victim.keys.len())];
                let ctx = context(attacks[next_attack].1, &mut rng);
                let offset = n as f64 / args.rate;
                let now = Moment {
                    mono: t as f64 + 0.5 + offset,
                    wall: START + t + offset as u64,
                };
                if brake
                    .charge_at("t", &victim.name, key, Some(&ctx), now)
                    .is_err()
                {
                    break;
                }
                n += 1;
            }
            let causes: Vec<_> = std::mem::take(
                &mut *breaches
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let by = causes.first().map_or("none".to_owned(), |(_, c)| match c {
                Cause::Budget(b) => format!("budget {}/{} s", b.unwraps, b.per_secs),
                Cause::Baseline(_) => "baseline".to_owned(),
            });
            got.push((n, victim.peak, by));
            // The operator, having judged it, releases the identity and its keys.
            let victims = std::iter::once(Subject::Identity {
                tenant: "t".into(),
                identity: victim.name.clone(),
            })
            .chain(victim.keys.iter().map(|k| Subject::Key {
                tenant: "t".into(),
                key: k.clone(),
            }));
            for subject in causes.into_iter().map(|(s, _)| s).chain(victims) {
                brake.release(&subject);
            }
            next_attack += 1;
        }
    }
    let days = args.days;
    println!(
        "replayed {days} days: {unwraps} ordinary unwraps ({:.1} a second on average), {refused} refused",
        unwraps as f64 / (days * DAY) as f64
    );
    println!("false alarms: {}", false_alarms.len());
    for (t, subject, cause) in false_alarms.iter().take(20) {
        println!(
            "  day {} {:02}:{:02} UTC: {subject}: {cause}",
            t / DAY,
            t % DAY / 3600,
            t % 3600 / 60
        );
    }
    got.sort_by_key(|g| g.0);
    if let (Some(min), Some(max)) = (got.first(), got.last()) {
        let median = &got[got.len() / 2];
        println!(
            "attacks: {} at {} unwraps/s: DEKs before the hold min {} median {} max {} ({:.2} s of the thief's traffic at most)",
            got.len(),
            args.rate,
            min.0,
            median.0,
            max.0,
            max.0 as f64 / args.rate
        );
        let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
        for g in &got {
            *by.entry(g.2.as_str()).or_default() += 1;
        }
        println!("  held by: {by:?}");
        println!(
            "  the largest: {} DEKs from an identity whose daily peak is {:.1}/s",
            max.0, max.1
        );
    }
    Ok(())
}
