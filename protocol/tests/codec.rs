//! Property tests: every message round-trips; random, truncated and inconsistent input is refused.

use bytes::Bytes;
use proptest::prelude::*;
use rho_protocol::*;

fn fp() -> impl Strategy<Value = Fingerprint> {
    "[0-9a-f]{64}".prop_map(|h| Fingerprint(format!("sha256:{h}")))
}

/// A rank of some world, or none.
fn rank() -> impl Strategy<Value = Option<Rank>> {
    prop::option::of((1u32..=u32::MAX).prop_flat_map(|w| (0..w, Just(w))))
        .prop_map(|r| r.and_then(|(rank, world)| Rank::new(rank, world)))
}

fn token_batch() -> impl Strategy<Value = TokenBatch> {
    (
        1usize..5,
        2usize..40,
        any::<u64>(),
        0u64..10,
        "[a-z0-9-]{0,12}",
        fp(),
        rank(),
    )
        .prop_flat_map(|(rows, window, seq, epoch, run_id, tokenizer, rank)| {
            (
                prop::collection::vec(any::<u32>(), rows * window),
                prop::collection::vec(0..=window as u32, rows),
                prop::collection::vec(prop::collection::btree_set(0..window as u32, 0..4), rows),
            )
                .prop_map(move |(tokens, lengths, starts)| TokenBatch {
                    run_id: run_id.clone(),
                    seq: seq >> 12,
                    epoch,
                    rows,
                    window,
                    tokenizer: tokenizer.clone(),
                    tokens,
                    lengths,
                    doc_starts: starts
                        .into_iter()
                        .map(|s| s.into_iter().collect())
                        .collect(),
                    stream: None,
                    rank,
                })
        })
}

fn message() -> impl Strategy<Value = Message> {
    let run = "[a-z0-9]{0,8}";
    prop_oneof![
        token_batch().prop_map(Message::Batch),
        (token_batch(), fp()).prop_flat_map(|(batch, ref_model)| {
            let n = batch.rows * (batch.window - 1);
            prop::collection::vec(-100f32..100f32, n).prop_map(move |ref_loss| {
                Message::Scored(ScoredBatch {
                    batch: batch.clone(),
                    ref_model: ref_model.clone(),
                    ref_loss,
                })
            })
        }),
        (run, any::<u32>(), rank()).prop_map(|(r, n, rank)| Message::Credit(Credit {
            run_id: r,
            n,
            rank,
        })),
        (run, prop::collection::vec(0u64..1 << 50, 0..20))
            .prop_map(|(r, seqs)| Message::Ack(Ack { run_id: r, seqs })),
        (run, 0u64..1 << 50).prop_map(|(r, at_ms)| Message::Heartbeat(Heartbeat {
            run_id: r,
            role: Role::Selector,
            at_ms
        })),
        (run, 0u64..1 << 50, any::<bool>(), rank()).prop_map(|(r, n, with, rank)| {
            Message::Resume(Resume {
                run_id: r,
                next_seq: n,
                stream: with.then(|| Box::new(identity())),
                rank,
            })
        }),
        (run, ".{0,30}").prop_map(|(r, reason)| Message::Shutdown(Shutdown { run_id: r, reason })),
        (run, 0u64..1 << 50).prop_map(|(r, total)| Message::End(End { run_id: r, total })),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(m in message()) {
        let frames = m.encode();
        let back = Message::decode(&frames, &Limits::default()).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn random_frames_never_panic(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..4)) {
        let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
        let _ = Message::decode(&frames, &Limits::default());
    }

    #[test]
    fn truncated_tensor_frames_are_refused(b in token_batch(), cut in 1usize..8) {
        let mut frames = Message::Batch(b).encode();
        let len = frames[1].len();
        frames[1] = frames[1].slice(..len.saturating_sub(cut));
        let refused = matches!(Message::decode(&frames, &Limits::default()), Err(DecodeError::FrameSize { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn truncated_headers_are_refused(m in message(), keep in 0.0f64..1.0) {
        let mut frames = m.encode();
        let n = (frames[0].len() as f64 * keep) as usize;
        frames[0] = frames[0].slice(..n);
        prop_assert!(Message::decode(&frames, &Limits::default()).is_err());
    }

    #[test]
    fn mutated_headers_never_panic(m in message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut frames = m.encode();
        let mut h = frames[0].to_vec();
        let i = at.index(h.len());
        h[i] = byte;
        frames[0] = Bytes::from(h);
        let _ = Message::decode(&frames, &Limits::default());
    }
}

fn header_of(m: &Message) -> serde_json::Value {
    serde_json::from_slice(&m.encode()[0]).unwrap()
}

fn with_header(m: &Message, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<Bytes> {
    let mut frames = m.encode();
    let mut h = header_of(m);
    edit(&mut h);
    frames[0] = Bytes::from(serde_json::to_vec(&h).unwrap());
    frames
}

fn sample_batch() -> Message {
    Message::Batch(TokenBatch {
        run_id: "r".into(),
        seq: 3,
        epoch: 0,
        rows: 2,
        window: 4,
        tokenizer: Fingerprint::of_bytes(b"tok"),
        tokens: (0..8).collect(),
        lengths: vec![4, 3],
        doc_starts: vec![vec![0, 2], vec![]],
        stream: Some(Box::new(identity())),
        rank: None,
    })
}

fn identity() -> StreamIdentity {
    StreamIdentity {
        tokenizer: Fingerprint::of_bytes(b"tok"),
        seq_len: 3,
        batch_size: 2,
        seed: 7,
        shuffle_window: 64,
        add_bos: false,
        add_eos: true,
        bos_token: None,
        eos_token: Some("</s>".into()),
        text_field: "text".into(),
        format: "auto".into(),
        max_doc_bytes: 1 << 20,
        corpus: Corpus {
            shards: 2,
            bytes: 1234,
            digest: Fingerprint::of_bytes(b"corpus"),
        },
    }
}

#[test]
fn version_is_checked() {
    let frames = with_header(&sample_batch(), |h| h["rho"] = 2.into());
    assert_eq!(
        Message::decode(&frames, &Limits::default()),
        Err(DecodeError::Version {
            got: 2,
            supported: 1
        })
    );
}

#[test]
fn oversized_messages_are_refused_before_parsing() {
    let limits = Limits {
        max_message_bytes: 16,
        max_header_bytes: 16,
    };
    let err = Message::decode(&sample_batch().encode(), &limits).unwrap_err();
    assert!(
        matches!(err, DecodeError::TooLarge { max: 16, .. }),
        "{err}"
    );
}

#[test]
fn a_claimed_shape_larger_than_the_frame_is_refused() {
    let frames = with_header(&sample_batch(), |h| {
        h["tensors"][0]["shape"] = serde_json::json!([2, 1u64 << 40]);
    });
    assert!(Message::decode(&frames, &Limits::default()).is_err());
    let frames = with_header(&sample_batch(), |h| {
        h["tensors"][0]["shape"] = serde_json::json!([u64::MAX, u64::MAX]);
        h["lengths"] = serde_json::json!([0]);
    });
    assert!(Message::decode(&frames, &Limits::default()).is_err());
}

#[test]
fn inconsistent_fields_name_the_field() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|h| h["lengths"] = serde_json::json!([5, 3])),
            "lengths",
        ),
        (
            Box::new(|h| h["doc_starts"] = serde_json::json!([[2, 2], []])),
            "doc_starts",
        ),
        (
            Box::new(|h| h["doc_starts"] = serde_json::json!([[9], []])),
            "doc_starts",
        ),
        (
            Box::new(|h| h["doc_starts"] = serde_json::json!([[]])),
            "doc_starts",
        ),
        (
            Box::new(|h| h["tensors"][0]["dtype"] = "i64".into()),
            "tokens",
        ),
        (Box::new(|h| h["kind"] = "bogus".into()), "bogus"),
        (
            Box::new(|h| h["ref_model"] = "sha256:00".into()),
            "ref_model",
        ),
    ];
    for (edit, needle) in cases {
        let frames = with_header(&sample_batch(), edit);
        let err = Message::decode(&frames, &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{err} should mention {needle}"
        );
    }
}

#[test]
fn a_rank_names_its_world_and_lies_below_it() {
    let credit = Message::Credit(Credit {
        run_id: "r".into(),
        n: 2,
        rank: Rank::new(1, 3),
    });
    let resume = Message::Resume(Resume {
        run_id: "r".into(),
        next_seq: 7,
        stream: None,
        rank: Rank::new(1, 3),
    });
    let mut batch = sample_batch();
    if let Message::Batch(b) = &mut batch {
        b.rank = Rank::new(1, 3);
    }
    for message in [credit, resume, batch] {
        let h = header_of(&message);
        assert_eq!(
            (h["rank"].as_u64(), h["world"].as_u64()),
            (Some(1), Some(3)),
            "{}",
            message.kind()
        );
        refuses_a_bad_rank(&message);
    }
    assert!(Rank::new(3, 3).is_none());
    assert_eq!(Rank::new(1, 3), Some(Rank { rank: 1, world: 3 }));
}

/// A rank at or past its world, or a rank without its world or the other way round, is refused
/// with the field named.
fn refuses_a_bad_rank(message: &Message) {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|h| h["rank"] = 3.into()), "rank"),
        (
            Box::new(|h| {
                h.as_object_mut().unwrap().remove("world");
            }),
            "world",
        ),
        (
            Box::new(|h| {
                h.as_object_mut().unwrap().remove("rank");
            }),
            "rank",
        ),
    ];
    for (edit, needle) in cases {
        let err = Message::decode(&with_header(message, edit), &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{}: {err} should mention {needle}",
            message.kind()
        );
    }
}

#[test]
fn frame_count_is_checked() {
    let mut frames = sample_batch().encode();
    frames.push(Bytes::from_static(b"extra"));
    assert!(matches!(
        Message::decode(&frames, &Limits::default()),
        Err(DecodeError::FrameCount { .. })
    ));
    let mut credit = Message::Credit(Credit {
        run_id: "r".into(),
        n: 1,
        rank: None,
    })
    .encode();
    credit.push(Bytes::new());
    assert!(Message::decode(&credit, &Limits::default()).is_err());
    assert_eq!(
        Message::decode(&[], &Limits::default()),
        Err(DecodeError::Empty)
    );
}

#[test]
fn header_layout_is_the_documented_one() {
    // docs/PROTOCOL.md shows this header; keep the two in step.
    let h = header_of(&sample_batch());
    assert_eq!(h["rho"], 1);
    assert_eq!(h["kind"], "batch");
    assert_eq!(h["tensors"][0]["name"], "tokens");
    assert_eq!(h["tensors"][0]["dtype"], "u32");
    assert_eq!(h["tensors"][0]["shape"], serde_json::json!([2, 4]));
    let frames = sample_batch().encode();
    assert_eq!(&frames[1][..8], &[0, 0, 0, 0, 1, 0, 0, 0]);
}

#[test]
fn signed_messages_verify_and_tampering_is_refused() {
    let key = Key::new(b"a secret of the run, 32 bytes..").unwrap();
    let other = Key::new(b"somebody else's secret, 32 bytes").unwrap();
    let m = sample_batch();
    let signed = m.encode_with(Some(&key));
    assert_eq!(signed.len(), m.encode().len() + 1);
    let h: serde_json::Value = serde_json::from_slice(&signed[0]).unwrap();
    assert_eq!(h["auth"], "hmac-sha256");
    assert_eq!(
        Message::decode_with(&signed, &Limits::default(), Some(&key)).unwrap(),
        m
    );
    // A receiver without the secret still reads it.
    assert_eq!(
        Message::decode_with(&signed, &Limits::default(), None).unwrap(),
        m
    );
    // Unsigned, signed by another key, or altered in any frame: refused.
    let refused = |frames: &[Bytes]| {
        matches!(
            Message::decode_with(frames, &Limits::default(), Some(&key)),
            Err(DecodeError::Unauthenticated)
        )
    };
    assert!(refused(&m.encode()));
    assert!(refused(&m.encode_with(Some(&other))));
    let mut altered = signed.clone();
    let mut tokens = altered[1].to_vec();
    tokens[0] ^= 1;
    altered[1] = Bytes::from(tokens);
    assert!(refused(&altered));
    assert!(Message::decode_with(&[], &Limits::default(), Some(&key)).is_err());
}
