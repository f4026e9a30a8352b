//! The batch stream: determinism, resumption, packing against plain `tokenizers`, epochs, ranks.

mod common;

use common::*;
use rho_loader::order::shard_order;
use rho_protocol::TokenBatch;

/// The real tokens of every row, concatenated in stream order (assumes no shuffling).
fn flatten(batches: &[TokenBatch]) -> Vec<u32> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.rows {
            out.extend_from_slice(&b.row(r)[..b.lengths[r] as usize]);
        }
    }
    out
}

fn expected_ids(tk: &tokenizers::Tokenizer, docs: &[String], eos: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for d in docs {
        out.extend_from_slice(tk.encode(d.as_str(), false).unwrap().get_ids());
        out.push(eos);
    }
    out
}

#[test]
fn ids_equal_plain_tokenizers_for_two_tokenizer_types() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shards = parquet_corpus(&data, 3, 40);
    let all: Vec<String> = shards.concat();
    let bpe = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let wp = wordpiece_tokenizer(&all, &dir.path().join("wp.json"));
    for (path, eos_name) in [(bpe, "</s>"), (wp, "[SEP]")] {
        let mut cfg = config(&data, &path, 31, 3);
        cfg.shuffle_window = std::num::NonZero::new(1).unwrap();
        cfg.eos_token = Some(eos_name.into());
        let (batches, counts) = batches(&cfg, 0);
        let tk = tokenizers::Tokenizer::from_file(&path).unwrap();
        let eos = tk.token_to_id(eos_name).unwrap();
        // Documents in the epoch's shard order.
        let order = shard_order(3, cfg.seed, 0);
        let docs: Vec<String> = order.iter().flat_map(|&s| shards[s].clone()).collect();
        let expected = expected_ids(&tk, &docs, eos);
        assert!(
            flatten(&batches) == expected,
            "tokenizer {eos_name}: ids differ"
        );
        assert_eq!(counts.docs, 120);
        assert_eq!(counts.tokens, expected.len() as u64);
        // Document starts point at the token after each EOS.
        let mut starts = Vec::new();
        let mut pos = 0;
        for d in &docs {
            starts.push(pos);
            pos += tk.encode(d.as_str(), false).unwrap().len() + 1;
        }
        let got: Vec<usize> = batches
            .iter()
            .flat_map(|b| (0..b.rows).map(move |r| (b, r)))
            .enumerate()
            .flat_map(|(i, (b, r))| b.doc_starts[r].iter().map(move |&s| i * 32 + s as usize))
            .collect();
        assert_eq!(got, starts);
    }
}

#[test]
fn resuming_at_any_batch_is_bit_identical_and_skips_tokenization() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    parquet_corpus(&data, 5, 30);
    let tok = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let mut cfg = config(&data, &tok, 15, 2);
    cfg.epochs = std::num::NonZero::new(2).unwrap();
    cfg.state_dir = Some(dir.path().join("state"));
    let (full, full_counts) = batches(&cfg, 0);
    assert!(full.len() > 40, "{} batches", full.len());
    for (i, b) in full.iter().enumerate() {
        assert_eq!(b.seq, i as u64);
    }
    // The uninterrupted run wrote the shard index, so a resume tokenizes only from the shard
    // where its block starts: in epoch 1, nothing of epoch 0; at the last batch, at most 2 of
    // the 5 shards (30 documents each).
    for start in [
        1,
        7,
        full.len() as u64 / 2 - 1,
        full.len() as u64 / 2 + 3,
        full.len() as u64 - 1,
    ] {
        let (resumed, counts) = batches(&cfg, start);
        assert!(
            resumed[..] == full[start as usize..],
            "resume at {start} differs"
        );
        assert!(counts.docs <= full_counts.docs);
        if start > full.len() as u64 / 2 {
            assert!(
                counts.docs <= full_counts.docs / 2,
                "resume at {start} re-tokenized {} docs",
                counts.docs
            );
        }
    }
    let (_, last) = batches(&cfg, full.len() as u64 - 1);
    assert!(
        last.docs <= 60,
        "resume at the last batch re-tokenized {} docs",
        last.docs
    );
    // A resumed run that is stopped and resumed again.
    let (first, _) = batches_limit(&cfg, 5, 9);
    let next = first.last().unwrap().seq + 1;
    let (second, _) = batches(&cfg, next);
    let mut stitched = full[..5].to_vec();
    stitched.extend(first);
    stitched.extend(second);
    assert!(stitched == full, "stitched resumes differ");
    // Past the end: a clear error.
    let metrics = std::sync::Arc::new(rho_loader::metrics::Metrics::default());
    let mut s = rho_loader::Stream::new(&cfg, metrics).unwrap();
    let err = s
        .run(full.len() as u64, |_| rho_loader::Flow::Continue)
        .unwrap_err();
    assert!(err.to_string().contains("holds"), "{err}");
}

#[test]
fn resuming_without_an_index_counts_and_still_matches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    parquet_corpus(&data, 3, 20);
    let tok = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let cfg = config(&data, &tok, 20, 3);
    let (full, _) = batches(&cfg, 0);
    let (resumed, _) = batches(&cfg, 4);
    assert_eq!(&resumed[..], &full[4..]);
}

#[test]
fn order_depends_on_the_seed_and_epochs_differ() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    parquet_corpus(&data, 4, 20);
    let tok = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let mut cfg = config(&data, &tok, 15, 1);
    cfg.epochs = std::num::NonZero::new(2).unwrap();
    let (a, _) = batches(&cfg, 0);
    let (a2, _) = batches(&cfg, 0);
    assert!(a == a2, "same seed, different batches");
    cfg.seed = 1;
    let (b, _) = batches(&cfg, 0);
    assert_eq!(a.len(), b.len());
    assert!(a != b, "different seeds, same batches");
    // Both epochs hold the same tokens, in a different order.
    let half = a.len() / 2;
    let key = |bs: &[TokenBatch]| {
        let mut v = flatten(bs);
        v.sort();
        v
    };
    assert!(
        key(&a[..half]) == key(&a[half..]),
        "epochs hold different tokens"
    );
    assert!(
        flatten(&a[..half]) != flatten(&a[half..]),
        "epochs in the same order"
    );
    assert_eq!(a[half].epoch, 1);
}

#[test]
fn ranks_split_one_stream_batch_by_batch_and_all_end_with_the_same_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Three shards: split by shards, two ranks would get two and one.
    parquet_corpus(&data, 3, 15);
    let tok = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let mut cfg = config(&data, &tok, 15, 2);
    let (whole, _) = batches(&cfg, 0);
    let g = whole.len() as u64;
    assert!(
        [2, 3, 4].iter().any(|w| !g.is_multiple_of(*w)),
        "{g} batches leave no tail to drop"
    );
    for world in [2u32, 3, 4] {
        cfg.world = std::num::NonZero::new(world).unwrap();
        let w = u64::from(world);
        let mut seen = Vec::new();
        for rank in 0..world {
            cfg.rank = Some(rank);
            let (bs, _) = batches(&cfg, 0);
            assert_eq!(bs.len() as u64, g / w, "world {world} rank {rank}");
            for (i, b) in bs.iter().enumerate() {
                let seq = i as u64 * w + u64::from(rank);
                assert_eq!(b.seq, seq);
                // Exactly the single loader's batch of that sequence number.
                assert!(
                    b.tokens == whole[seq as usize].tokens,
                    "world {world} seq {seq}"
                );
            }
            seen.extend(bs.iter().map(|b| b.seq));
            // Resume works per rank too.
            let (resumed, _) = batches(&cfg, 2);
            assert!(
                resumed[..] == bs[2..],
                "world {world} rank {rank}: resume differs"
            );
        }
        // Together the ranks cover the stream but its last `g % world` batches.
        seen.sort();
        assert_eq!(seen, (0..g / w * w).collect::<Vec<_>>());
        // One loader of every rank issues exactly those batches, each once, in order: what the
        // per-rank loaders issue together, tokenizing the corpus once.
        cfg.rank = None;
        let (all, _) = batches(&cfg, 0);
        assert_eq!(all.len() as u64, g / w * w, "world {world}: one loader");
        for b in &all {
            assert!(
                b.tokens == whole[b.seq as usize].tokens,
                "world {world} seq {}",
                b.seq
            );
        }
        assert_eq!(
            all.iter().map(|b| b.seq).collect::<Vec<_>>(),
            seen,
            "world {world}"
        );
        // It resumes anywhere, inside a group of `world` too.
        for start in [1, w, w + 1] {
            let (resumed, _) = batches(&cfg, start);
            assert!(
                resumed[..] == all[start as usize..],
                "world {world}: resume at {start} differs"
            );
        }
    }
}

/// Every batch the stream of `cfg` issues from `start` on, split as `stride` says.
fn split(
    cfg: &rho_loader::LoaderConfig,
    stride: rho_loader::RankStride,
    start: u64,
) -> Vec<TokenBatch> {
    split_batches_limit(cfg, stride, start, usize::MAX).0
}

#[test]
fn a_run_stopped_on_two_ranks_resumes_on_one_or_three_with_every_batch_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    parquet_corpus(&data, 3, 15);
    let tok = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let cfg = config(&data, &tok, 15, 2);
    let (whole, _) = batches(&cfg, 0);
    let g = whole.len() as u64;
    assert!(g >= 12, "{g} batches");
    // Two ranks trained 3 steps each: global batches 0..6, the global cursor 6.
    let cursor = 6;
    for world in [1u64, 2, 3, 4] {
        let every = rho_loader::RankStride {
            world,
            rank: None,
            origin: cursor,
        };
        let after = split(&cfg, every, cursor);
        // From the cursor on, batch `g` is rank `(g - cursor) % world`'s, each rank gets
        // `floor((G - cursor) / world)`, and the batches are the single stream's.
        let n = (g - cursor) / world;
        assert_eq!(after.len() as u64, n * world, "world {world}");
        for (i, b) in after.iter().enumerate() {
            let seq = cursor + i as u64;
            assert_eq!(b.seq, seq);
            assert!(
                b.tokens == whole[seq as usize].tokens,
                "world {world} seq {seq}"
            );
            let tag = (world > 1)
                .then(|| rho_protocol::Rank::new((i as u64 % world) as u32, world as u32).unwrap());
            assert_eq!(b.rank, tag, "world {world} seq {seq}");
        }
        // Before the cursor (trained on two ranks) and after it: every global batch once, but
        // the last `(G - cursor) % world`.
        let mut trained: Vec<u64> = (0..cursor).chain(after.iter().map(|b| b.seq)).collect();
        trained.dedup();
        assert_eq!(trained, (0..cursor + n * world).collect::<Vec<_>>());
        // A loader of one rank issues exactly that rank's share, and resumes inside it.
        for rank in 0..world {
            let one = rho_loader::RankStride {
                rank: Some(rank),
                ..every
            };
            let mine = split(&cfg, one, 0);
            let expected: Vec<&TokenBatch> = after
                .iter()
                .filter(|b| (b.seq - cursor) % world == rank)
                .collect();
            assert_eq!(mine.len(), expected.len(), "world {world} rank {rank}");
            assert!(
                mine.iter().zip(&expected).all(|(a, b)| a == *b),
                "world {world} rank {rank}"
            );
            assert!(
                split(&cfg, one, 1)[..] == mine[1..],
                "world {world} rank {rank}: resume"
            );
        }
    }
}

#[test]
fn a_tokenizer_files_own_padding_and_truncation_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    parquet_corpus(&data, 2, 20);
    let plain = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    // The same tokenizer as many published files ship it: fixed padding and truncation to 16.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plain).unwrap()).unwrap();
    json["padding"] = serde_json::json!({"strategy": {"Fixed": 16}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
    json["truncation"] = serde_json::json!({"direction": "Right", "max_length": 16,
        "strategy": "LongestFirst", "stride": 0});
    let padded = dir.path().join("padded.json");
    std::fs::write(&padded, json.to_string()).unwrap();
    // Loaded as is, that file would cut every document to 16 ids.
    let raw = tokenizers::Tokenizer::from_file(&padded).unwrap();
    let long = "a long document ".repeat(40);
    assert_eq!(raw.encode(long.as_str(), false).unwrap().len(), 16);

    let (want, counts) = batches(&config(&data, &plain, 31, 3), 0);
    let (got, padded_counts) = batches(&config(&data, &padded, 31, 3), 0);
    assert_eq!(counts.tokens, padded_counts.tokens);
    assert_eq!(want.len(), got.len());
    for (a, b) in want.iter().zip(&got) {
        assert!(
            a.tokens == b.tokens && a.lengths == b.lengths,
            "batch {}",
            a.seq
        );
    }
}

/// A corpus that yields nothing names its shards and what is wrong with each (a held-out path
/// that does not exist, an empty file), instead of a bare count.
#[test]
fn an_empty_corpus_names_its_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    parquet_corpus(&data, 1, 5);
    let tk = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let missing = dir.path().join("held-out.jsonl");
    let mut cfg = config(&data, &tk, 16, 2);
    cfg.data.paths = vec![missing.display().to_string(), empty.display().to_string()];
    let metrics = std::sync::Arc::new(rho_loader::metrics::Metrics::default());
    let mut s = rho_loader::Stream::new(&cfg, metrics).unwrap();
    let err = s.run(0, |_| rho_loader::Flow::Continue).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{} (does not exist)", missing.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} (empty)", empty.display())),
        "{text}"
    );
}

/// Every batch carries the identity of its stream; the identity follows every setting that
/// shapes the stream, and the corpus's shards, but not the epochs or the rank.
#[test]
fn every_batch_carries_its_streams_identity() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    parquet_corpus(&data, 2, 20);
    let tk = bpe_tokenizer(&data, &dir.path().join("bpe.json"));
    let cfg = config(&data, &tk, 16, 2);
    let identity = |cfg: &rho_loader::LoaderConfig| {
        let (batches, _) = batches(cfg, 0);
        let first = batches[0].stream.clone().expect("a stream identity");
        assert!(batches.iter().all(|b| b.stream.as_ref() == Some(&first)));
        first
    };
    let base = identity(&cfg);
    assert_eq!(
        (base.seq_len, base.batch_size, base.corpus.shards),
        (16, 2, 2)
    );
    let mut more_epochs = cfg.clone();
    more_epochs.epochs = std::num::NonZero::new(2).unwrap();
    assert_eq!(identity(&more_epochs), base);
    let mut seeded = cfg.clone();
    seeded.seed = 3;
    let d = base.differences(&identity(&seeded));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].item, "loader.seed");
    // A shard added changes the corpus.
    parquet_corpus(&dir.path().join("data/more"), 1, 5);
    let d = base.differences(&identity(&cfg));
    assert_eq!(
        d.iter().map(|d| d.item).collect::<Vec<_>>(),
        ["loader.data.paths"]
    );
}
