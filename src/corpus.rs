//! A synthetic corpus shaped like OpenWebMath: math web pages (worked arithmetic and algebra
//! with correct results, definitions, LaTeX) interleaved with spans no model should learn from
//! (random ids and hashes, session URLs, cookie banners and navigation boilerplate). Written as
//! parquet shards in the OpenWebMath schema (`url`, `text`, `date`, `metadata`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use rho_loader::order::SplitMix64;
use rho_loader::sources::{write_parquet_shard, Row};

#[derive(Args, Clone)]
pub struct SynthArgs {
    /// Output directory for the shards.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    #[arg(long, default_value_t = 500)]
    pub docs_per_shard: usize,
    /// Share of a document's paragraphs that are noise, 0..1.
    #[arg(long, default_value_t = 0.4)]
    pub noise: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let files = write_corpus(&args)?;
    eprintln!("wrote {} shards to {}", files.len(), args.out.display());
    Ok(())
}

/// Writes the shards and returns their paths.
pub fn write_corpus(args: &SynthArgs) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut rng = SplitMix64::new(args.seed ^ 0x0057_4D41_5448);
    let mut files = Vec::new();
    for s in 0..args.shards {
        let rows: Vec<Row> = (0..args.docs_per_shard)
            .map(|i| {
                let text = document(&mut rng, args.noise);
                Row {
                    url: format!("https://math.example.org/p/{s}/{i}"),
                    text: Some(text),
                    date: format!("2023-{:02}-{:02}", 1 + rng.below(12), 1 + rng.below(28)),
                    metadata: r#"{"extraction_info":{"found_math":true}}"#.into(),
                }
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

fn math_paragraph(rng: &mut SplitMix64) -> String {
    let a = 2 + rng.below(98) as i64;
    let b = 2 + rng.below(98) as i64;
    let c = 1 + rng.below(9) as i64;
    match rng.below(6) {
        0 => format!("To add {a} and {b}, we line up the digits: {a} + {b} = {}. Check: {} - {b} = {a}.", a + b, a + b),
        1 => format!("We compute the product: ${a} \\times {b} = {}$. So the area of a {a} by {b} rectangle is {} square units.", a * b, a * b),
        2 => format!("Solve ${c}x + {a} = {}$. Subtract {a} from both sides: ${c}x = {}$, so $x = {b}$.", c * b + a, c * b),
        3 => format!("Simplify $\\frac{{{}}}{{{}}}$: both are divisible by {c}, so the fraction equals $\\frac{{{a}}}{{{b}}}$.", a * c, b * c),
        4 => format!("{} The derivative of $x^{c}$ is ${c}x^{{{}}}$, by the power rule.", pick(rng, &["Recall:", "Definition.", "Note that"]), c - 1),
        _ => format!("A prime number is a natural number greater than 1 with no divisors other than 1 and itself; {} is {}.", a, if is_prime(a) { "prime" } else { "not prime" }),
    }
}

fn is_prime(n: i64) -> bool {
    n > 1 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn noise_paragraph(rng: &mut SplitMix64) -> String {
    match rng.below(4) {
        0 => format!("session={:016x}{:016x}", rng.next_u64(), rng.next_u64()),
        1 => format!(
            "https://tracker.example.com/c?id={:x}&ref={:x}",
            rng.next_u64(),
            rng.next_u64()
        ),
        2 => pick(
            rng,
            &[
                "We use cookies to improve your experience. Accept all | Reject | Preferences",
                "Home | Forums | Latest | Log in | Sign up | Privacy | Terms",
                "Share this: Twitter Facebook Reddit Email Print",
            ],
        )
        .to_string(),
        _ => (0..12)
            .map(|_| format!("{:x}", rng.below(1 << 20)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn document(rng: &mut SplitMix64, noise: f64) -> String {
    let paragraphs = 3 + rng.below(8);
    let mut out = String::from(pick(
        rng,
        &[
            "# Worked examples\n\n",
            "## Exercise\n\n",
            "Math help forum\n\n",
            "",
        ],
    ));
    for _ in 0..paragraphs {
        let noisy = (rng.next_u64() as f64 / u64::MAX as f64) < noise;
        out.push_str(&if noisy {
            noise_paragraph(rng)
        } else {
            math_paragraph(rng)
        });
        out.push_str("\n\n");
    }
    out
}

/// The default demo corpus location inside a run directory.
pub fn data_dir(run: &Path) -> PathBuf {
    run.join("data")
}
