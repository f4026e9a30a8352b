//! A synthetic corpus shaped like OpenWebMath: math web pages whose content can be learned
//! (worked arithmetic and algebra with correct results, definitions, derivations, LaTeX, in
//! varied templates with varied numbers) mixed with spans no model can or should learn from
//! (random ids and hashes, session and tracking URLs, cookie banners and navigation
//! boilerplate, shuffled text, wrong results), and, where asked, with easy paragraphs: text of
//! the target distribution that any model learns at once (counting, tables, statements quoted
//! word for word), the "already learned" tokens that make up much of real math pages. Written as
//! parquet shards in the OpenWebMath schema (`url`, `text`, `date`, `metadata`); each document's
//! `metadata` records its noise and easy spans as byte ranges of `text` (`{"synthetic":
//! {"noise": [[start, end, "kind"], ...], "easy": [[start, end], ...]}}`), so that what a
//! selection kept can be checked against what is noise and what is easy.
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
    /// Chance that a paragraph that is not noise is easy (counting, tables, quoted statements),
    /// 0..1.
    #[arg(long, default_value_t = 0.0)]
    pub easy: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let files = write_corpus(&args)?;
    let (mut bytes, mut noise, mut easy) = (0usize, 0usize, 0usize);
    for s in 0..args.shards {
        for d in shard_docs(&args, s) {
            bytes += d.text.len();
            noise += d.noise_bytes();
            easy += d.easy.iter().map(|&(s, e)| e - s).sum::<usize>();
        }
    }
    let pct = |x: usize| 100.0 * x as f64 / bytes.max(1) as f64;
    eprintln!(
        "wrote {} shards to {}: {bytes} bytes of text, {:.1}% noise, {:.1}% easy",
        files.len(),
        args.out.display(),
        pct(noise),
        pct(easy)
    );
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

/// One generated document and where its noise and easy paragraphs are (byte ranges of `text`).
#[derive(Debug, Clone, Default)]
pub struct Doc {
    pub text: String,
    pub noise: Vec<(usize, usize, NoiseKind)>,
    /// Easy paragraphs: clean text of the target distribution that is learned at once.
    pub easy: Vec<(usize, usize)>,
}

impl Doc {
    /// The kind of noise that byte range `start..end` overlaps, if any.
    pub fn noise_kind(&self, start: usize, end: usize) -> Option<NoiseKind> {
        self.noise
            .iter()
            .find(|&&(s, e, _)| start < e && s < end.max(start + 1))
            .map(|&(_, _, k)| k)
    }

    /// Whether byte range `start..end` overlaps an easy paragraph.
    pub fn is_easy(&self, start: usize, end: usize) -> bool {
        self.easy
            .iter()
            .any(|&(s, e)| start < e && s < end.max(start + 1))
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
            "synthetic": {"noise": spans, "easy": self.easy},
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
        .map(|_| document(&mut rng, args.noise, args.easy))
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

/// A paragraph of the target distribution that both a reference and a fresh model learn almost
/// at once: counting, a table of squares, or one of a few statements quoted word for word.
fn easy_paragraph(rng: &mut SplitMix64) -> String {
    match rng.below(3) {
        0 => {
            let step = [1i64, 2, 5, 10][rng.below(4) as usize];
            let first = step * (1 + rng.below(4) as i64);
            let terms: Vec<String> = (0..12).map(|i| (first + i * step).to_string()).collect();
            format!("Counting by {step}s: {}, and so on.", terms.join(", "))
        }
        1 => {
            let first = 1 + rng.below(3) as i64;
            let terms: Vec<String> = (first..first + 8).map(|n| format!("${n}^2 = {}$", n * n)).collect();
            format!("Table of squares: {}.", terms.join(", "))
        }
        _ => pick(
            rng,
            &[
                "The quadratic formula: the solutions of $ax^2 + bx + c = 0$ are $x = \\frac{-b \\pm \\sqrt{b^2 - 4ac}}{2a}$.",
                "The area of a circle of radius $r$ is $A = \\pi r^2$, and its circumference is $C = 2 \\pi r$.",
                "The first ten prime numbers are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29.",
                "Multiplication distributes over addition: $a(b + c) = ab + ac$ for all numbers $a$, $b$ and $c$.",
                "The angles of a triangle add up to $180^\\circ$.",
                "A function $f$ is even if $f(-x) = f(x)$ and odd if $f(-x) = -f(x)$ for every $x$.",
            ],
        )
        .to_string(),
    }
}

/// One document: a header, then paragraphs, each noise with chance `noise`, else easy with
/// chance `easy`, else a worked example.
pub fn document(rng: &mut SplitMix64, noise: f64, easy: f64) -> Doc {
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
    let (mut spans, mut easy_spans) = (Vec::new(), Vec::new());
    for _ in 0..paragraphs {
        if chance(rng, noise) {
            let (p, kind) = noise_paragraph(rng);
            spans.push((text.len(), text.len() + p.len(), kind));
            text.push_str(&p);
        } else if easy > 0.0 && chance(rng, easy) {
            let p = easy_paragraph(rng);
            easy_spans.push((text.len(), text.len() + p.len()));
            text.push_str(&p);
        } else {
            text.push_str(&math_paragraph(rng, false));
        }
        text.push_str("\n\n");
    }
    Doc {
        text,
        noise: spans,
        easy: easy_spans,
    }
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
            easy: 0.0,
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
            easy: 0.0,
            seed: 1,
        };
        assert!(shard_docs(&args, 0).iter().all(|d| d.noise.is_empty()));
    }

    #[test]
    fn easy_paragraphs_are_clean_and_labelled() {
        let args = SynthArgs {
            out: PathBuf::new(),
            shards: 1,
            docs_per_shard: 200,
            noise: 0.3,
            easy: 0.5,
            seed: 5,
        };
        let docs = shard_docs(&args, 0);
        let easy: usize = docs.iter().flat_map(|d| &d.easy).map(|&(s, e)| e - s).sum();
        let total: usize = docs.iter().map(|d| d.text.len()).sum();
        assert!(
            easy as f64 / total as f64 > 0.15,
            "easy share {easy} of {total}"
        );
        for d in &docs {
            for &(s, e) in &d.easy {
                assert!(!d.text[s..e].contains("\n\n"));
                // Easy text is never noise.
                assert!(d.noise_kind(s, e).is_none(), "{:?}", &d.text[s..e]);
                assert!(d.is_easy(s, s + 1) && !d.is_easy(e, e + 1));
            }
            let meta: serde_json::Value = serde_json::from_str(&d.metadata()).unwrap();
            assert_eq!(
                meta["synthetic"]["easy"].as_array().unwrap().len(),
                d.easy.len()
            );
        }
        // Without easy paragraphs the documents are those of before: `easy` draws nothing.
        let plain = SynthArgs {
            easy: 0.0,
            ..args.clone()
        };
        let before = shard_docs(&plain, 0);
        assert!(before.iter().all(|d| d.easy.is_empty()));
    }
}
