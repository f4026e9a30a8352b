//! Shared selection test vectors (`tests/vectors/selection.json` at the repository root): the
//! masks the Rust selection gives, which every other implementation (the Python `rho_stream`
//! package among them) must reproduce exactly.
//!
//! The file is written once by the ignored test below
//! (`cargo test -p rho-trainer --test vectors -- --ignored`) and committed; the normal test
//! checks that the selection still gives exactly those masks.
//!
//! Scores are JSON numbers, except NaN (`null`) and the infinities (`"inf"`, `"-inf"`). Cases of
//! the `random` rule also name the `seed` and `step` whose key (`random_key(seed, step)`) scores
//! them.

use rho_trainer::selection::{random_key, select_keyed, Losses, Scope, ScoreRule};
use serde_json::{json, Value};

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/selection.json")
}

fn to_json(x: f32) -> Value {
    if x.is_nan() {
        Value::Null
    } else if x.is_infinite() {
        json!(if x > 0.0 { "inf" } else { "-inf" })
    } else {
        json!(x)
    }
}

fn from_json(v: &Value) -> f32 {
    match v {
        Value::Null => f32::NAN,
        Value::String(s) if s == "inf" => f32::INFINITY,
        Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
        other => other.as_f64().expect("a number") as f32,
    }
}

/// A case: its inputs and the mask the selection gives.
#[allow(clippy::too_many_arguments)]
fn case(
    name: &str,
    rule: ScoreRule,
    scope: Scope,
    ratio: f64,
    rows: usize,
    len: usize,
    current: Vec<f32>,
    reference: Vec<f32>,
    valid: Vec<bool>,
) -> Value {
    seeded_case(
        name,
        rule,
        scope,
        ratio,
        (rows, len),
        (current, reference, valid),
        (0, 0),
    )
}

/// A case whose random key comes from `(seed, step)`; both are written for the `random` rule.
fn seeded_case(
    name: &str,
    rule: ScoreRule,
    scope: Scope,
    ratio: f64,
    (rows, len): (usize, usize),
    (current, reference, valid): (Vec<f32>, Vec<f32>, Vec<bool>),
    (seed, step): (u64, u64),
) -> Value {
    let mask = select_keyed(
        rule,
        scope,
        ratio,
        &Losses {
            rows,
            len,
            current: &current,
            reference: Some(&reference),
            valid: &valid,
        },
        random_key(seed, step),
    );
    let mut v = json!({
        "name": name,
        "rule": rule.name(),
        "scope": if scope == Scope::Batch { "batch" } else { "sequence" },
        "ratio": ratio,
        "rows": rows,
        "len": len,
        "current": current.iter().map(|&x| to_json(x)).collect::<Vec<_>>(),
        "reference": reference.iter().map(|&x| to_json(x)).collect::<Vec<_>>(),
        "valid": valid,
        "mask": mask.iter().map(|&m| m as u8).collect::<Vec<_>>(),
    });
    if rule == ScoreRule::Random {
        v["seed"] = json!(seed);
        v["step"] = json!(step);
    }
    v
}

/// SplitMix64, so that the cases never change with a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn cases() -> Vec<Value> {
    let mut out = vec![
        case(
            "ties keep the earlier position",
            ScoreRule::Excess,
            Scope::Batch,
            0.5,
            1,
            4,
            vec![1.0, 2.0, 1.0, 2.0],
            vec![0.0; 4],
            vec![true; 4],
        ),
        case(
            "round half up: 0.5 of 5 keeps 3",
            ScoreRule::Current,
            Scope::Batch,
            0.5,
            1,
            5,
            vec![5.0, 4.0, 3.0, 2.0, 1.0],
            vec![0.0; 5],
            vec![true; 5],
        ),
        case(
            "NaN ranks below minus infinity; padding is never kept",
            ScoreRule::Excess,
            Scope::Batch,
            0.75,
            2,
            3,
            vec![f32::NAN, 1.0, f32::NEG_INFINITY, 3.0, 9.0, f32::INFINITY],
            vec![0.0, 0.5, 0.0, 1.0, 0.0, 0.0],
            vec![true, true, true, true, true, false],
        ),
        case(
            "per sequence",
            ScoreRule::Reference,
            Scope::Sequence,
            0.34,
            3,
            3,
            vec![0.0; 9],
            vec![3.0, 1.0, 2.0, 0.5, 0.5, 0.1, 7.0, -1.0, 2.0],
            vec![true, true, true, true, true, true, true, false, true],
        ),
        case(
            "ratio 0 keeps none, ratio 1 keeps every valid one",
            ScoreRule::Excess,
            Scope::Batch,
            0.0,
            1,
            3,
            vec![1.0, 2.0, 3.0],
            vec![0.0; 3],
            vec![true; 3],
        ),
        case(
            "every excess equal (the reference is the model): the first k valid positions",
            ScoreRule::Excess,
            Scope::Batch,
            0.6,
            2,
            5,
            vec![2.5; 10],
            vec![2.5; 10],
            vec![true, true, false, true, true, true, true, true, true, true],
        ),
        case(
            "ties at the k-th value across rows: the earlier fill the places left",
            ScoreRule::Excess,
            Scope::Batch,
            0.5,
            2,
            4,
            vec![5.0, 1.0, 2.0, 2.0, 2.0, 9.0, 2.0, 0.0],
            vec![0.0; 8],
            vec![true; 8],
        ),
        case(
            "ties at the k-th value per sequence",
            ScoreRule::Excess,
            Scope::Sequence,
            0.5,
            2,
            4,
            vec![1.0, 1.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0],
            vec![0.0; 8],
            vec![true; 8],
        ),
        case(
            "a row with no valid target keeps nothing and counts for nothing",
            ScoreRule::Excess,
            Scope::Sequence,
            0.5,
            3,
            2,
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            vec![0.0; 6],
            vec![false, false, true, true, true, false],
        ),
        case(
            "none keeps every valid position",
            ScoreRule::None,
            Scope::Batch,
            0.1,
            1,
            4,
            vec![1.0, 2.0, 3.0, 4.0],
            vec![0.0; 4],
            vec![true, true, false, true],
        ),
    ];
    let mut rng = Rng(20240411);
    let rules = [
        ScoreRule::Excess,
        ScoreRule::Reference,
        ScoreRule::Current,
        ScoreRule::None,
    ];
    for i in 0..40 {
        let rows = 1 + rng.below(4) as usize;
        let len = 1 + rng.below(24) as usize;
        let n = rows * len;
        // Coarse values, so that ties are common.
        let value = |rng: &mut Rng| -> f32 {
            match rng.below(40) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                _ => (rng.below(64) as f32 - 20.0) / 8.0,
            }
        };
        let current: Vec<f32> = (0..n).map(|_| value(&mut rng)).collect();
        let reference: Vec<f32> = (0..n).map(|_| value(&mut rng)).collect();
        let valid: Vec<bool> = (0..n).map(|_| rng.below(8) != 0).collect();
        let ratio = [
            0.0,
            0.1,
            0.25,
            0.5,
            0.6,
            0.7,
            1.0,
            rng.below(1000) as f64 / 1000.0,
        ][rng.below(8) as usize];
        let rule = rules[rng.below(4) as usize];
        let scope = if rng.below(2) == 0 {
            Scope::Batch
        } else {
            Scope::Sequence
        };
        out.push(case(
            &format!("random {i}"),
            rule,
            scope,
            ratio,
            rows,
            len,
            current,
            reference,
            valid,
        ));
    }
    // The random rule: the losses do not matter, the key does.
    for (i, (seed, step)) in [
        (0u64, 0u64),
        (0, 1),
        (1, 0),
        (7, 123),
        (u64::MAX, 5),
        (42, 99_999),
    ]
    .into_iter()
    .enumerate()
    {
        let (rows, len) = (1 + i % 3, 5 + 7 * i);
        let n = rows * len;
        let current: Vec<f32> = (0..n).map(|_| (rng.below(64) as f32) / 8.0).collect();
        let reference: Vec<f32> = (0..n).map(|_| (rng.below(64) as f32) / 8.0).collect();
        let valid: Vec<bool> = (0..n).map(|_| rng.below(8) != 0).collect();
        let scope = if i % 2 == 0 {
            Scope::Batch
        } else {
            Scope::Sequence
        };
        out.push(seeded_case(
            &format!("random rule {i}"),
            ScoreRule::Random,
            scope,
            [0.3, 0.5, 0.6][i % 3],
            (rows, len),
            (current, reference, valid),
            (seed, step),
        ));
    }
    out
}

#[test]
#[ignore = "writes tests/vectors/selection.json; run once, then commit the file"]
fn write_selection_vectors() {
    let text = serde_json::to_string_pretty(&json!({"cases": cases()})).unwrap();
    std::fs::create_dir_all(path().parent().unwrap()).unwrap();
    std::fs::write(path(), text + "\n").unwrap();
}

#[test]
fn selection_gives_the_committed_masks() {
    let text = std::fs::read_to_string(path()).expect("tests/vectors/selection.json");
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for c in cases {
        let floats =
            |k: &str| -> Vec<f32> { c[k].as_array().unwrap().iter().map(from_json).collect() };
        let rule: ScoreRule = serde_json::from_value(c["rule"].clone()).unwrap();
        let scope: Scope = serde_json::from_value(c["scope"].clone()).unwrap();
        let valid: Vec<bool> = c["valid"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect();
        let seed = c["seed"].as_u64().unwrap_or(0);
        let step = c["step"].as_u64().unwrap_or(0);
        let mask = select_keyed(
            rule,
            scope,
            c["ratio"].as_f64().unwrap(),
            &Losses {
                rows: c["rows"].as_u64().unwrap() as usize,
                len: c["len"].as_u64().unwrap() as usize,
                current: &floats("current"),
                reference: Some(&floats("reference")),
                valid: &valid,
            },
            random_key(seed, step),
        );
        let expected: Vec<f32> = c["mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(mask, expected, "case `{}`", c["name"]);
    }
}
