//! A synthetic corpus shaped like OpenWebMath: math web pages whose content can be learned
//! (worked arithmetic and algebra with correct results, definitions, derivations, LaTeX, in
//! varied templates with varied numbers) mixed with spans no model can or should learn from
//! (random ids and hashes, session and tracking URLs, cookie banners and navigation
//! boilerplate, shuffled text, wrong results). Written as parquet shards in the OpenWebMath
//! schema (`url`, `text`, `date`, `metadata`); each document's `metadata` records its noise
//! spans as byte ranges of `text` (`{"synthetic": {"noise": [[start, end, "kind"], ...]}}`), so
//! that what a selection kept can be checked against what is noise.
//!
//! Everything follows from the seed: the same arguments write the same bytes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use rho_loader::order::SplitMix64;
use rho_loader::sources::{write_parquet_shard, Row};

#[derive(Args, Clone, Debug)]
pub struct SynthArgs {
    /// Output directory for the shards.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    #[arg(long, default_value_t = 500)]
    pub docs_per_shard: usize,
    /// Chance that a paragraph is noise, 0..1 (0 writes a clean set).
    #[arg(long, default_value_t = 0.45)]
    pub noise: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let files = write_corpus(&args)?;
    eprintln!("wrote {} shards to {}", files.len(), args.out.display());
    Ok(())
}

/// What kind of noise a span is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseKind {
    /// Session ids, hashes, random hex: unlearnable.
    Id,
    /// Session and tracking URLs with random parameters.
    Url,
    /// Cookie banners, navigation and share bars.
    Boilerplate,
    /// The words of a math paragraph in random order.
    Shuffled,
    /// A worked example with a wrong result.
    WrongResult,
}

impl NoiseKind {
    pub fn name(self) -> &'static str {
        match self {
            NoiseKind::Id => "id",
            NoiseKind::Url => "url",
            NoiseKind::Boilerplate => "boilerplate",
            NoiseKind::Shuffled => "shuffled",
            NoiseKind::WrongResult => "wrong_result",
        }
    }
}

/// One generated document and where its noise is (byte ranges of `text`).
#[derive(Debug, Clone)]
pub struct Doc {
    pub text: String,
    pub noise: Vec<(usize, usize, NoiseKind)>,
}

impl Doc {
    /// The kind of noise that byte range `start..end` overlaps, if any.
    pub fn noise_kind(&self, start: usize, end: usize) -> Option<NoiseKind> {
        self.noise
            .iter()
            .find(|&&(s, e, _)| start < e && s < end.max(start + 1))
            .map(|&(_, _, k)| k)
    }

    /// Bytes of noise in the document.
    pub fn noise_bytes(&self) -> usize {
        self.noise.iter().map(|&(s, e, _)| e - s).sum()
    }

    fn metadata(&self) -> String {
        let spans: Vec<serde_json::Value> = self
            .noise
            .iter()
            .map(|&(s, e, k)| serde_json::json!([s, e, k.name()]))
            .collect();
        serde_json::json!({
            "extraction_info": {"found_math": true},
            "synthetic": {"noise": spans},
        })
        .to_string()
    }
}

/// The documents of shard `shard` of a corpus, in order.
pub fn shard_docs(args: &SynthArgs, shard: usize) -> Vec<Doc> {
    let mut rng = SplitMix64::new(
        args.seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(shard as u64)
            ^ 0x0057_4D41_5448,
    );
    (0..args.docs_per_shard)
        .map(|_| document(&mut rng, args.noise))
        .collect()
}

/// Writes the shards and returns their paths.
pub fn write_corpus(args: &SynthArgs) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut files = Vec::new();
    for s in 0..args.shards {
        let mut rng = SplitMix64::new(args.seed ^ (s as u64) << 32 ^ 0xDA7E);
        let rows: Vec<Row> = shard_docs(args, s)
            .into_iter()
            .enumerate()
            .map(|(i, doc)| Row {
                url: format!("https://math.example.org/s{}/p/{s}/{i}", args.seed),
                metadata: doc.metadata(),
                text: Some(doc.text),
                date: format!("2023-{:02}-{:02}", 1 + rng.below(12), 1 + rng.below(28)),
            })
            .collect();
        let path = args.out.join(format!("shard-{s:05}.parquet"));
        write_parquet_shard(&path, &rows, 128)
            .with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
    }
    Ok(files)
}

fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

fn chance(rng: &mut SplitMix64, p: f64) -> bool {
    ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
}

fn is_prime(n: i64) -> bool {
    n > 1 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

/// A worked example; with `wrong`, its result is off (and the check, where there is one, too).
fn math_paragraph(rng: &mut SplitMix64, wrong: bool) -> String {
    let a = 2 + rng.below(48) as i64;
    let b = 2 + rng.below(48) as i64;
    let c = 2 + rng.below(8) as i64;
    let off = if wrong { 1 + rng.below(9) as i64 } else { 0 };
    let lead = pick(
        rng,
        &[
            "",
            "Example. ",
            "Solution: ",
            "Answer: ",
            "Step 1. ",
            "Hint: ",
        ],
    );
    let body = match rng.below(12) {
        0 => format!(
            "To add {a} and {b}, line up the digits: {a} + {b} = {}. Check: {} - {b} = {a}.",
            a + b + off,
            a + b + off
        ),
        1 => format!(
            "We compute the product: ${a} \\times {b} = {}$. So the area of a {a} by {b} rectangle is {} square units.",
            a * b + off,
            a * b + off
        ),
        2 => format!(
            "Solve ${c}x + {a} = {}$. Subtract {a} from both sides: ${c}x = {}$, so $x = {}$.",
            c * b + a,
            c * b,
            b + off
        ),
        3 => format!(
            "Simplify $\\frac{{{}}}{{{}}}$: both are divisible by {c}, so the fraction equals $\\frac{{{}}}{{{b}}}$.",
            a * c,
            b * c,
            a + off
        ),
        4 => format!(
            "{} The derivative of $x^{{{c}}}$ is ${c}x^{{{}}}$, by the power rule $\\frac{{d}}{{dx}} x^n = n x^{{n-1}}$.",
            pick(rng, &["Recall:", "Definition.", "Note that", "Remember that"]),
            c - 1 + off
        ),
        5 => {
            let prime = is_prime(a) != wrong;
            format!(
                "A prime number is a natural number greater than 1 with no divisors other than 1 and itself; {a} is {}.",
                if prime { "prime" } else { "not prime" }
            )
        }
        6 => format!(
            "The greatest common divisor of {} and {} is {}, since ${} = {} \\cdot {c}$ and ${} = {} \\cdot {c}$.",
            a * c,
            b * c,
            gcd(a * c, b * c) + off,
            a * c,
            a,
            b * c,
            b
        ),
        7 => format!(
            "Expand $(x + {a})(x + {b})$: we get $x^2 + {}x + {}$.",
            a + b + off,
            a * b
        ),
        8 => format!(
            "The sum of the first {a} natural numbers is $\\frac{{{a} \\cdot {}}}{{2}} = {}$.",
            a + 1,
            a * (a + 1) / 2 + off
        ),
        9 => format!(
            "If a train travels {} km in {c} hours, its average speed is $\\frac{{{}}}{{{c}}} = {}$ km/h.",
            a * c,
            a * c,
            a + off
        ),
        10 => format!(
            "By the Pythagorean theorem, a right triangle with legs {} and {} has hypotenuse $\\sqrt{{{}^2 + {}^2}} = {}$.",
            3 * c,
            4 * c,
            3 * c,
            4 * c,
            5 * c + off
        ),
        _ => format!(
            "Compute {a}% of {}: $\\frac{{{a}}}{{100}} \\times {} = {}$.",
            100 * b,
            100 * b,
            a * b + off
        ),
    };
    format!("{lead}{body}")
}

fn noise_paragraph(rng: &mut SplitMix64) -> (String, NoiseKind) {
    match rng.below(6) {
        0 => (
            format!(
                "{}={:016x}{:016x}",
                pick(rng, &["session", "sid", "token", "PHPSESSID"]),
                rng.next_u64(),
                rng.next_u64()
            ),
            NoiseKind::Id,
        ),
        1 => (
            format!(
                "https://{}/{}?id={:x}&ref={:x}",
                pick(
                    rng,
                    &[
                        "tracker.example.com/c",
                        "ads.example.net/click",
                        "cdn.example.org/px"
                    ]
                ),
                rng.below(100_000),
                rng.next_u64(),
                rng.next_u64() >> rng.below(32)
            ),
            NoiseKind::Url,
        ),
        2 => (
            pick(
                rng,
                &[
                    "We use cookies to improve your experience. Accept all | Reject | Preferences",
                    "Home | Forums | Latest | Log in | Sign up | Privacy | Terms",
                    "Share this: Twitter Facebook Reddit Email Print",
                    "Posted by guest | Reply | Quote | Report | Back to top",
                    "Subscribe to our newsletter! Enter your email address: [ ] Submit",
                ],
            )
            .to_string(),
            NoiseKind::Boilerplate,
        ),
        3 => (
            (0..6 + rng.below(10))
                .map(|_| format!("{:x}", rng.next_u64() >> rng.below(48)))
                .collect::<Vec<_>>()
                .join(" "),
            NoiseKind::Id,
        ),
        4 => {
            let p = math_paragraph(rng, false);
            let mut words: Vec<&str> = p.split(' ').collect();
            for i in (1..words.len()).rev() {
                words.swap(i, rng.below(i as u64 + 1) as usize);
            }
            (words.join(" "), NoiseKind::Shuffled)
        }
        _ => (math_paragraph(rng, true), NoiseKind::WrongResult),
    }
}

/// One document: a header, then paragraphs, each noise with chance `noise`.
pub fn document(rng: &mut SplitMix64, noise: f64) -> Doc {
    let paragraphs = 3 + rng.below(8);
    let mut text = String::from(pick(
        rng,
        &[
            "# Worked examples\n\n",
            "## Exercise\n\n",
            "Math help forum\n\n",
            "Homework solutions\n\n",
            "Lecture notes\n\n",
            "",
        ],
    ));
    let mut spans = Vec::new();
    for _ in 0..paragraphs {
        if chance(rng, noise) {
            let (p, kind) = noise_paragraph(rng);
            spans.push((text.len(), text.len() + p.len(), kind));
            text.push_str(&p);
        } else {
            text.push_str(&math_paragraph(rng, false));
        }
        text.push_str("\n\n");
    }
    Doc { text, noise: spans }
}

/// The default demo corpus location inside a run directory.
pub fn data_dir(run: &Path) -> PathBuf {
    run.join("data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_exactly_the_noise_text() {
        let args = SynthArgs {
            out: PathBuf::new(),
            shards: 1,
            docs_per_shard: 200,
            noise: 0.5,
            seed: 7,
        };
        let docs = shard_docs(&args, 0);
        let (mut noise, mut total) = (0usize, 0usize);
        for d in &docs {
            total += d.text.len();
            noise += d.noise_bytes();
            for &(s, e, _) in &d.noise {
                assert!(s < e && e <= d.text.len());
                // A span is one paragraph: it does not cross a paragraph break.
                assert!(!d.text[s..e].contains("\n\n"), "{:?}", &d.text[s..e]);
                assert!(d.noise_kind(s, s + 1).is_some() && d.noise_kind(e, e + 1).is_none());
            }
        }
        let share = noise as f64 / total as f64;
        assert!((0.3..0.7).contains(&share), "noise share {share}");
        // Same seed, same documents; other seed, other documents.
        assert_eq!(shard_docs(&args, 0)[5].text, docs[5].text);
        let other = SynthArgs { seed: 8, ..args };
        assert_ne!(shard_docs(&other, 0)[5].text, docs[5].text);
    }

    #[test]
    fn clean_sets_have_no_noise() {
        let args = SynthArgs {
            out: PathBuf::new(),
            shards: 1,
            docs_per_shard: 100,
            noise: 0.0,
            seed: 1,
        };
        assert!(shard_docs(&args, 0).iter().all(|d| d.noise.is_empty()));
    }
}
