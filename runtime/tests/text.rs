//! Text handling on SmolLM2's real tokenizer and chat template (read in place from
//! ../shared/tools/smollm2): tokenization as transformers does it, streaming decode that never
//! splits a character, and ChatML rendering as `apply_chat_template` renders it.

use std::path::PathBuf;

use llmc_runtime::text::{render_chat, Message, StreamDecoder, Text};

fn smollm2_file(name: &str) -> PathBuf {
    let shared = std::env::var_os("LLMC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    shared.join("tools/smollm2").join(name)
}

fn tokenizer() -> Text {
    Text::from_bytes(&std::fs::read(smollm2_file("tokenizer.json")).unwrap()).unwrap()
}

#[test]
fn tokenizes_like_transformers() {
    let t = tokenizer();
    let ids = t.encode("The capital of France is", true).unwrap();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    assert_eq!(t.decode(&ids).unwrap(), "The capital of France is");
    // special tokens are single tokens
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!(t.encode("<|im_start|>user\n", false).unwrap()[0], 1);
}

#[test]
fn streaming_never_splits_a_character() {
    let t = tokenizer();
    let text = "Crème brûlée, 東京タワー and 🦀🦀 — naïve façade ∑ ∞";
    let ids = t.encode(text, false).unwrap();
    let mut dec = StreamDecoder::new(&t);
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        let piece = dec.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
        if piece.is_empty() {
            held_back += 1;
        }
        out.push_str(&piece);
    }
    assert_eq!(out, text);
    assert!(held_back > 0, "some character spans several tokens (else this test tests nothing)");
}

#[test]
fn chatml_renders_like_apply_chat_template() {
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(smollm2_file("tokenizer_config.json")).unwrap()).unwrap();
    let template = tc["chat_template"].as_str().unwrap();
    let user = |c: &str| Message { role: "user".into(), content: c.into() };
    // transformers' apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    // with this template: a default system turn when the first message is not a system one.
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let got =
        render_chat(template, &[user("What is the capital of France?")], Some("<|im_start|>"), Some("<|im_end|>"))
            .unwrap();
    assert_eq!(got, want);
    let sys = Message { role: "system".into(), content: "Be brief.".into() };
    let asst = Message { role: "assistant".into(), content: "Paris.".into() };
    let got = render_chat(template, &[sys, user("Capital of France?"), asst, user("And Italy?")], None, None).unwrap();
    assert_eq!(
        got,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n\
         <|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n"
    );
    // the same file as chat_template.jinja renders identically
    let jinja = std::fs::read_to_string(smollm2_file("chat_template.jinja")).unwrap();
    assert_eq!(
        render_chat(&jinja, &[user("x")], None, None).unwrap(),
        render_chat(template, &[user("x")], None, None).unwrap()
    );
}

#[test]
fn bad_templates_are_errors() {
    let e = render_chat("{% for m in messages %}", &[], None, None).unwrap_err().to_string();
    assert!(e.contains("chat template"), "{e}");
    let e = render_chat("{{ raise_exception('roles must alternate') }}", &[], None, None).unwrap_err().to_string();
    assert!(e.contains("roles must alternate"), "{e}");
}

/// Found by `tests/fuzz.rs`: `tokenizers` panicked on a tokenizer.json whose `decoder` value
/// was not JSON (one flipped bit), and `minijinja` on `loop.cycle()` without arguments and on
/// `""[::-1]` (SmolLM2-style template, empty message). Each is an error now, not a crash.
#[test]
fn library_panics_on_bad_input_are_errors() {
    let bad_tok = br###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":z"cleanup":true,"prefix":"##","type":"WordPiece"},"model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"###;
    assert!(Text::from_bytes(bad_tok).is_err());
    let msgs = [Message { role: "user".into(), content: String::new() }];
    let e = render_chat("{% for m in messages %}{{ loop.cycle() }}{% endfor %}", &msgs, None, None).unwrap_err();
    assert!(e.to_string().starts_with("chat template"), "{e}");
    assert!(render_chat("{{ messages[0].content[::-1] }}", &msgs, None, None).is_err());
}

/// A Unigram tokenizer.json with these `[piece, score]` items.
fn unigram_json(vocab: serde_json::Value) -> String {
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "Unigram", "unk_id": 0, "byte_fallback": false, "vocab": vocab}
    })
    .to_string()
}

/// Loads a tokenizer.json on a thread with a 2 MiB stack (a test thread's size): the load
/// error, if any (a stack overflow aborts the test process).
fn load_error_on_small_stack(json: String) -> Option<String> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || Text::from_bytes(json.as_bytes()).err().map(|e| e.to_string()))
        .unwrap()
        .join()
        .unwrap()
}

/// Found by `tests/fuzz.rs` (fuzz_tokenizer): a Unigram tokenizer.json whose first piece was
/// replaced by 76181 `a`s loaded, but dropping it overflowed the stack (recursive trie drop
/// in `tokenizers`) and aborted the process. Such a piece is refused at load.
#[test]
fn huge_unigram_piece_is_refused() {
    let tok = |piece: &str| unigram_json(serde_json::json!([[piece, 0.0], ["a", -1.0], ["b", -2.0]]));
    let t = Text::from_bytes(tok("<unk>").as_bytes()).unwrap();
    assert_eq!(t.encode("ab", false).unwrap(), vec![1, 2]);
    let e = load_error_on_small_stack(tok(&"a".repeat(76181)));
    assert!(e.is_some_and(|e| e.contains("Unigram piece of 76181 bytes")));
}

/// Found by `tests/fuzz.rs` (fuzz_tokenizer): the same long Unigram piece in a document that
/// breaks after it (the final `}` missing). `tokenizers` builds the model while it reads, then
/// fails and drops the half-built trie recursively: the stack overflowed before the piece check
/// ran. A document that is not JSON is refused before `tokenizers` sees it.
#[test]
fn huge_unigram_piece_in_broken_json_is_refused() {
    let doc = unigram_json(serde_json::json!([["<unk>", 0.0], ["a".repeat(190_919), -1.0], ["b", -2.0]]));
    let broken = doc[..doc.len() - 1].to_string();
    let e = load_error_on_small_stack(broken);
    assert!(e.is_some_and(|e| e.contains("not valid JSON")));
}

/// Found by `tests/fuzz.rs` (fuzz_tokenizer): a duplicated key made the piece-length check's
/// own parse fail, and the check waved the file through; `tokenizers` took it (the last key
/// wins) with its 116 kB Unigram piece and overflowed the stack dropping it. A tokenizer.json
/// the checks cannot read is now refused.
#[test]
fn duplicated_keys_do_not_bypass_the_checks() {
    let doc = unigram_json(serde_json::json!([["<unk>", 0.0], ["a".repeat(116_552), -1.0], ["b", -2.0]]));
    let dup = format!("{{\"post_processor\":null,{}", &doc[1..]);
    let e = load_error_on_small_stack(dup);
    assert!(e.as_deref().is_some_and(|e| e.contains("duplicate field `post_processor`")), "{e:?}");
}

/// Found by `tests/fuzz.rs` (fuzz_chat_template): a long operator chain in a template
/// overflowed the stack inside minijinja (`{{ 1 ~ 'a' ~ 'a' ... }}`, 8000 links, on a 2 MB
/// thread), aborting the process. Rendering now has its own large stack and templates a size
/// limit; this test runs on a 2 MB test thread.
#[test]
fn long_operator_chains_in_templates_do_not_overflow_the_stack() {
    let msgs = [Message { role: "user".into(), content: "hi".into() }];
    let chain = format!("{{{{ 1{} }}}}", " ~ 'a'".repeat(9000));
    assert_eq!(render_chat(&chain, &msgs, None, None).unwrap().len(), 9001);
    let minus = format!("{{{{ {}1 }}}}", "-".repeat(60000));
    assert_eq!(render_chat(&minus, &msgs, None, None).unwrap(), "1");
    let too_big = format!("{{{{ {}1 }}}}", "-".repeat(70000));
    assert!(render_chat(&too_big, &msgs, None, None).unwrap_err().to_string().contains("limit"));
}

/// Found by `tests/fuzz.rs` (fuzz_tokenizer): 652 added tokens of 197,368 characters each took
/// 150 s to load (their matcher is built at load). An added token over 4096 bytes is refused.
#[test]
fn huge_added_tokens_are_refused() {
    let tok = |content: &str| {
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null,
            "added_tokens": [{"id": 2, "content": content, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}
        })
        .to_string()
    };
    let t = Text::from_bytes(tok("<s>").as_bytes()).unwrap();
    assert_eq!(t.encode("<s>", true).unwrap(), vec![2]);
    let e = Text::from_bytes(tok(&"x".repeat(197_368)).as_bytes()).err().map(|e| e.to_string());
    assert!(e.as_deref().is_some_and(|e| e.contains("added token of 197368 bytes")), "{e:?}");
}

/// Found by `tests/fuzz.rs` (fuzz_tokenizer): a post-processor whose `single` template repeats
/// the sequence 1007 times made every encode (and the streamed decode of its ids) take minutes.
#[test]
fn huge_post_processor_templates_are_refused() {
    let tok = |items: usize| {
        let single: Vec<_> = (0..items).map(|_| serde_json::json!({"Sequence": {"id": "A", "type_id": 0}})).collect();
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "added_tokens": [],
            "pre_tokenizer": null, "decoder": null,
            "post_processor": {"type": "TemplateProcessing", "single": single,
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {}},
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}
        })
        .to_string()
    };
    let t = Text::from_bytes(tok(1).as_bytes()).unwrap();
    assert_eq!(t.encode("b", true).unwrap(), vec![1]);
    let e = Text::from_bytes(tok(1007).as_bytes()).err().map(|e| e.to_string());
    assert!(e.as_deref().is_some_and(|e| e.contains("template of 1007 items")), "{e:?}");
}

/// Arrays nested 120 deep in a tokenizer.json (serde_json itself allows 128) are refused by
/// name, before the untagged enums of `tokenizers` rebuild them recursively.
#[test]
fn deeply_nested_tokenizer_json_is_refused() {
    let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
    let json = format!(
        r#"{{"version":"1.0","added_tokens":[],"normalizer":{{"type":"Sequence","normalizers":[{deep}]}},
        "pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{{"type":"BPE","vocab":{{"a":0}},"merges":[]}}}}"#
    );
    let e = load_error_on_small_stack(json);
    assert!(e.as_deref().is_some_and(|m| m.contains("nests 123 levels")), "{e:?}");
    // strings with brackets and escaped quotes do not count
    let ok = r#"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,
        "decoder":null,"model":{"type":"BPE","vocab":{"[[[\"{{":0,"a":1},"merges":[]}}"#;
    assert!(Text::from_bytes(ok.as_bytes()).is_ok());
}
