//! Text in and out: the model's Hugging Face tokenizer (from the artifact), a streaming
//! decoder that never prints a partial UTF-8 character, and chat templates rendered with
//! minijinja.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::artifact::Artifact;
use crate::error::RuntimeError;

fn text_err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Usage(msg.into())
}

/// Runs a call into `tokenizers` or `minijinja` with a panic turned into an error: both have
/// panicked on malformed input (a bad decoder in tokenizer.json, `loop.cycle()` or `""[::-1]`
/// in a template; found by tests/fuzz.rs), and the input comes from the model.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, RuntimeError>) -> Result<T, RuntimeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
        Err(text_err(format!("{what}: the library failed on this input ({})", msg.unwrap_or("panic"))))
    })
}

/// A BPE tokenizer.json built the way `tokenizers` deserializes it (the same component types,
/// `TokenizerBuilder`, then the added tokens), except that the model is read by typed
/// visitors (`bpe_typed`): `tokenizers` reads every model through two untyped copies
/// (`serde_json::Value`) and its merges through a third, which for a 150k-token vocabulary took
/// most of the ~450 ms `llmc run` spent loading Qwen2.5's tokenizer. `None` (then the caller
/// takes `Tokenizer::from_bytes`) for anything else: other models, or any error, which the
/// full path then reports.
fn load_bpe_fast(bytes: &[u8]) -> Option<Tokenizer> {
    use serde_json::value::RawValue;
    use tokenizers::{
        AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper,
        PreTokenizerWrapper, TokenizerBuilder, TruncationParams,
    };
    #[derive(serde::Deserialize)]
    struct Added {
        id: u32,
        #[serde(flatten)]
        token: AddedToken,
    }
    #[derive(serde::Deserialize)]
    struct Doc<'a> {
        version: String,
        truncation: Option<TruncationParams>,
        padding: Option<PaddingParams>,
        #[serde(default)]
        added_tokens: Vec<Added>,
        normalizer: Option<NormalizerWrapper>,
        pre_tokenizer: Option<PreTokenizerWrapper>,
        post_processor: Option<PostProcessorWrapper>,
        decoder: Option<DecoderWrapper>,
        #[serde(borrow)]
        model: &'a RawValue,
    }
    let doc: Doc<'_> = serde_json::from_slice(bytes).ok()?;
    if doc.version != "1.0" {
        return None;
    }
    let bpe = bpe_typed(doc.model.get())?;
    let mut tok = TokenizerBuilder::new()
        .with_model(ModelWrapper::BPE(bpe))
        .with_normalizer(doc.normalizer)
        .with_pre_tokenizer(doc.pre_tokenizer)
        .with_post_processor(doc.post_processor)
        .with_decoder(doc.decoder)
        .with_truncation(doc.truncation)
        .with_padding(doc.padding)
        .build()
        .ok()?;
    let added: Vec<AddedToken> = doc.added_tokens.iter().map(|a| a.token.clone()).collect();
    tok.add_tokens(&added);
    // the ids the file gives its added tokens must be the ones they got (else the full path
    // decides, as `tokenizers` would with a warning)
    if doc.added_tokens.iter().any(|a| tok.token_to_id(&a.token.content) != Some(a.id)) {
        return None;
    }
    Some(Tokenizer::from(tok))
}

/// A BPE model section read with typed visitors only: `BPE`'s own deserializer reads the
/// merges through an untagged enum (`[["a", "b"], ...]` or `["a b", ...]`), which buffers all
/// of them as untyped values first. The same fields, the same builder calls, the same merge
/// formats (a string must split on its one space into two pieces); `None` where the library
/// would have to decide.
fn bpe_typed(json: &str) -> Option<tokenizers::models::bpe::BPE> {
    use serde::de::{Error as _, SeqAccess, Visitor};
    /// One merge, in either format.
    struct Merge(String, String);
    impl<'de> serde::Deserialize<'de> for Merge {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Merge, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Merge;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a merge: \"a b\" or [\"a\", \"b\"]")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Merge, E> {
                    let mut parts = v.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => Ok(Merge(a.to_string(), b.to_string())),
                        _ => Err(E::custom("a merge must be two pieces")),
                    }
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                    let a: String = seq.next_element()?.ok_or_else(|| A::Error::custom("empty merge"))?;
                    let b: String = seq.next_element()?.ok_or_else(|| A::Error::custom("short merge"))?;
                    match seq.next_element::<serde::de::IgnoredAny>()? {
                        None => Ok(Merge(a, b)),
                        Some(_) => Err(A::Error::custom("long merge")),
                    }
                }
            }
            d.deserialize_any(V)
        }
    }
    #[derive(serde::Deserialize)]
    struct Model {
        #[serde(rename = "type")]
        ty: Option<String>,
        dropout: Option<f32>,
        unk_token: Option<String>,
        continuing_subword_prefix: Option<String>,
        end_of_word_suffix: Option<String>,
        fuse_unk: Option<bool>,
        byte_fallback: Option<bool>,
        ignore_merges: Option<bool>,
        vocab: ahash::AHashMap<String, u32>,
        merges: Vec<Merge>,
    }
    let m: Model = serde_json::from_str(json).ok()?;
    // only a model that says it is BPE (the library tries untagged models in an order of its own)
    if m.ty.as_deref() != Some("BPE") {
        return None;
    }
    let mut b = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(m.vocab, m.merges.into_iter().map(|Merge(a, b)| (a, b)).collect());
    if let Some(x) = m.dropout {
        b = b.dropout(x);
    }
    if let Some(x) = m.unk_token {
        b = b.unk_token(x);
    }
    if let Some(x) = m.continuing_subword_prefix {
        b = b.continuing_subword_prefix(x);
    }
    if let Some(x) = m.end_of_word_suffix {
        b = b.end_of_word_suffix(x);
    }
    if let Some(x) = m.fuse_unk {
        b = b.fuse_unk(x);
    }
    if let Some(x) = m.byte_fallback {
        b = b.byte_fallback(x);
    }
    if let Some(x) = m.ignore_merges {
        b = b.ignore_merges(x);
    }
    b.build().ok()
}

/// The tokenizer bundled in an artifact.
pub struct Text {
    tok: Tokenizer,
}

impl Text {
    /// The artifact's tokenizer, or a clear error if it was compiled without one.
    pub fn from_artifact(art: &Artifact) -> Result<Text, RuntimeError> {
        let bytes = art.tokenizer_json().ok_or_else(|| {
            text_err(format!(
                "{} has no tokenizer (its model folder had no tokenizer.json); use --ids with token ids",
                art.path.display()
            ))
        })?;
        Text::from_bytes(bytes)
            .map_err(|e| RuntimeError::BadArtifact { path: art.path.clone(), msg: format!("tokenizer: {e}") })
    }

    /// A tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Text, RuntimeError> {
        check_tokenizer_json(bytes)?;
        let tok = guarded("tokenizer.json", || match load_bpe_fast(bytes) {
            Some(tok) => Ok(tok),
            None => Tokenizer::from_bytes(bytes).map_err(|e| text_err(format!("tokenizer.json: {e}"))),
        })?;
        Ok(Text { tok })
    }

    /// Token ids of `text`. `special`: let the tokenizer add its special tokens (BOS...) as
    /// `tokenizer(text)` does; chat prompts already contain them and pass `false`.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i32>, RuntimeError> {
        let enc = guarded("tokenizing the prompt", || {
            self.tok.encode(text, special).map_err(|e| text_err(format!("tokenizing the prompt: {e}")))
        })?;
        Ok(enc.get_ids().iter().map(|&i| i as i32).collect())
    }

    /// The BOS token the tokenizer puts before a text when it adds its special tokens
    /// (`tokenizer(text)` starts with it), if it does: Llama's `<s>` or
    /// `<|begin_of_text|>`; `None` for GPT-2 or SmolLM2, whose tokenizers add nothing (as
    /// llama.cpp's `add_bos_token` false). Tokens it appends (an EOS) are not reported.
    pub fn bos_added(&self) -> Result<Option<i32>, RuntimeError> {
        let with = self.encode("a", true)?;
        let without = self.encode("a", false)?;
        Ok(if with.len() > without.len() && with.ends_with(&without) { with.first().copied() } else { None })
    }

    /// Token ids of a document: no special token added, and special-token text inside it
    /// (`<|endoftext|>` written out in the file) tokenized as plain text, as llama.cpp's
    /// perplexity tokenizes its input (`parse_special` false).
    pub fn encode_document(&self, text: &str) -> Result<Vec<i32>, RuntimeError> {
        let mut tok = self.tok.clone();
        tok.set_encode_special_tokens(true);
        let enc = tok.encode(text, false).map_err(|e| text_err(format!("tokenizing the text: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i32).collect())
    }

    /// The text of `ids`, special tokens included (as transformers' `decode` does by default).
    pub fn decode(&self, ids: &[i32]) -> Result<String, RuntimeError> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        guarded("decoding", || self.tok.decode(&ids, false).map_err(|e| text_err(format!("decoding: {e}"))))
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Id of a token given as text (e.g. a special token), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i32> {
        self.tok.token_to_id(token).map(|i| i as i32)
    }
}

/// The deepest nesting of arrays and objects accepted in a tokenizer.json.
pub const MAX_JSON_DEPTH: usize = 32;

/// The deepest nesting of `[`/`{` in a JSON text (outside strings), without parsing it.
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The longest Unigram piece accepted, in bytes. `tokenizers` keeps a Unigram vocabulary in a
/// character trie that it drops recursively, one stack frame per character: a 76k-character
/// piece (found by tests/fuzz.rs) overflowed a 2 MB thread stack when the tokenizer was
/// dropped, aborting the process. Real pieces are at most a few hundred bytes.
pub const MAX_UNIGRAM_PIECE: usize = 4096;
/// The most items a post-processor template (`single`, `pair`) may have.
pub const MAX_TEMPLATE_ITEMS: usize = 64;

/// The parts of a tokenizer.json the checks read. The vocab is walked without being kept (a
/// 151k-token BPE vocab parsed into a `serde_json::Value` took 125 ms of every load).
#[derive(serde::Deserialize)]
struct TokDoc {
    #[serde(default)]
    added_tokens: Option<Vec<TokAdded>>,
    #[serde(default)]
    post_processor: serde_json::Value,
    #[serde(default)]
    model: Option<TokModel>,
}

#[derive(serde::Deserialize)]
struct TokAdded {
    #[serde(default)]
    content: Option<StrLen>,
}

#[derive(serde::Deserialize)]
struct TokModel {
    #[serde(rename = "type", default)]
    ty: Option<String>,
    #[serde(default)]
    vocab: Option<LongestPiece>,
}

/// The length of a string; anything else reads as 0.
struct StrLen(usize);

/// The longest first string of the items of an array vocab (Unigram's `[piece, score]`); a
/// map vocab (BPE, WordPiece) reads as 0.
struct LongestPiece(usize);

/// An array item's first string's length (`[piece, score]`), 0 for anything else.
struct FirstStrLen(usize);

mod lenient {
    use super::{FirstStrLen, LongestPiece, StrLen};
    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// A visitor that maps any JSON value to `0` (objects walked and ignored) except where a
    /// method is overridden.
    macro_rules! any_zero {
        ($t:ident) => {
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<$t, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok($t(0))
            }
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_unit<E>(self) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_none<E>(self) -> Result<$t, E> {
                Ok($t(0))
            }
        };
    }

    impl<'de> Deserialize<'de> for StrLen {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StrLen, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = StrLen;
                any_zero!(StrLen);
                fn visit_str<E>(self, s: &str) -> Result<StrLen, E> {
                    Ok(StrLen(s.len()))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<StrLen, A::Error> {
                    while a.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(StrLen(0))
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for FirstStrLen {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FirstStrLen, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = FirstStrLen;
                any_zero!(FirstStrLen);
                fn visit_str<E>(self, _: &str) -> Result<FirstStrLen, E> {
                    Ok(FirstStrLen(0))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<FirstStrLen, A::Error> {
                    let first = a.next_element::<StrLen>()?.map_or(0, |l| l.0);
                    while a.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(FirstStrLen(first))
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for LongestPiece {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LongestPiece, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = LongestPiece;
                any_zero!(LongestPiece);
                fn visit_str<E>(self, _: &str) -> Result<LongestPiece, E> {
                    Ok(LongestPiece(0))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<LongestPiece, A::Error> {
                    let mut m = 0;
                    while let Some(FirstStrLen(l)) = a.next_element()? {
                        m = m.max(l);
                    }
                    Ok(LongestPiece(m))
                }
            }
            d.deserialize_any(V)
        }
    }
}

fn check_tokenizer_json(bytes: &[u8]) -> Result<(), RuntimeError> {
    // Deep nesting is refused before any deserializer sees it (a guard, not a found crash):
    // serde_json stops at 128 levels, but the untagged enums of `tokenizers` rebuild nested
    // values recursively, frame by frame. Real tokenizer.json files nest fewer than 10 levels.
    let depth = json_depth(bytes);
    if depth > MAX_JSON_DEPTH {
        return Err(text_err(format!(
            "tokenizer.json nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed"
        )));
    }
    // Not JSON is refused here, before `tokenizers` sees it: its deserializer builds the model
    // while it reads, so a document that breaks after a long Unigram piece (found by
    // tests/fuzz.rs: a 190,919-byte piece, then a missing final `}`) dropped the half-built
    // trie recursively and overflowed the stack. JSON the checks below cannot read is refused
    // too, never waved through: a duplicated `post_processor` key (found by tests/fuzz.rs) made
    // this parse fail while `tokenizers` took the file, 116 kB Unigram piece and all, and
    // overflowed the stack dropping it. (`tokenizers` reads with serde_json too; what it
    // accepts and this refuses is a duplicated key or a misshapen `added_tokens`.)
    let doc = match serde_json::from_slice::<TokDoc>(bytes) {
        Ok(d) => d,
        Err(e) => {
            serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
                .map_err(|_| text_err(format!("tokenizer.json is not valid JSON: {e}")))?;
            return Err(text_err(format!("tokenizer.json: {e}")));
        }
    };
    // Added tokens become one matcher (Aho-Corasick) built at load: 652 added tokens of 197k
    // characters each (found by tests/fuzz.rs) took 150 s to load. Real added tokens are a
    // few dozen bytes.
    let added = doc.added_tokens.unwrap_or_default();
    let longest = added.iter().filter_map(|t| t.content.as_ref()).map(|l| l.0).max().unwrap_or(0);
    if longest > MAX_UNIGRAM_PIECE {
        return Err(text_err(format!(
            "tokenizer.json: an added token of {longest} bytes is over the {MAX_UNIGRAM_PIECE}-byte limit"
        )));
    }
    // A post-processor template repeats the input once per `Sequence` item: a `single` of 1007
    // items (found by tests/fuzz.rs) made every encode and streamed decode take minutes. Real
    // templates have a handful of items (BOS, the sequence, EOS).
    let pp = &doc.post_processor;
    let templates = std::iter::once(pp).chain(pp["processors"].as_array().into_iter().flatten());
    for t in templates {
        for key in ["single", "pair"] {
            let n = t[key].as_array().map_or(0, Vec::len);
            if n > MAX_TEMPLATE_ITEMS {
                return Err(text_err(format!(
                    "tokenizer.json: a post-processor `{key}` template of {n} items is over the {MAX_TEMPLATE_ITEMS}-item limit"
                )));
            }
        }
    }
    let Some(model) = doc.model else { return Ok(()) };
    if model.ty.as_deref() != Some("Unigram") {
        return Ok(());
    }
    match model.vocab.map_or(0, |v| v.0) {
        len if len > MAX_UNIGRAM_PIECE => Err(text_err(format!(
            "tokenizer.json: a Unigram piece of {len} bytes is over the {MAX_UNIGRAM_PIECE}-byte limit"
        ))),
        _ => Ok(()),
    }
}

/// Turns generated ids into text pieces as they arrive. Multi-byte characters split over
/// tokens are held back until complete: nothing printed is ever a broken character.
pub struct StreamDecoder<'t> {
    text: &'t Text,
    ids: Vec<i32>,
    printed: usize,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(text: &'t Text) -> StreamDecoder<'t> {
        StreamDecoder { text, ids: Vec::new(), printed: 0 }
    }

    /// Adds a token; returns the new text that is now complete (possibly empty).
    pub fn push(&mut self, id: i32) -> Result<String, RuntimeError> {
        self.ids.push(id);
        let all = self.text.decode(&self.ids)?;
        if all.ends_with('\u{FFFD}') || !all.is_char_boundary(self.printed.min(all.len())) || all.len() < self.printed {
            return Ok(String::new()); // an incomplete character: wait for the next token
        }
        let piece = all[self.printed..].to_string();
        self.printed = all.len();
        Ok(piece)
    }

    /// Everything decoded so far.
    pub fn text(&self) -> Result<String, RuntimeError> {
        self.text.decode(&self.ids)
    }
}

/// One message of a chat.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The most work a chat template may do (minijinja fuel: about one unit per instruction). Real
/// templates use a few hundred units per message; a runaway loop hits the limit in well under
/// a second instead of hanging.
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// The most bytes a rendered chat may have (far beyond any context window).
pub const TEMPLATE_OUTPUT_LIMIT: usize = 16 << 20;

/// Collects rendered output up to [`TEMPLATE_OUTPUT_LIMIT`], then fails the render.
struct LimitedOutput {
    buf: Vec<u8>,
    over: bool,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > TEMPLATE_OUTPUT_LIMIT {
            self.over = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The largest chat template accepted (real ones are a few KB, the largest known ~20 KB).
pub const MAX_TEMPLATE_BYTES: usize = 64 << 10;

/// minijinja parses and evaluates operator chains recursively, ~400 bytes of stack per link:
/// `{{ 1 ~ 'a' ~ 'a' ... }}` with 8000 links overflowed a 2 MB thread stack (found by
/// tests/fuzz.rs), and a stack overflow aborts the process. Templates render on a thread with
/// this much stack, twice what the longest chain under `MAX_TEMPLATE_BYTES` needs (65536
/// unary minuses); it is reserved, not touched, by a normal template.
const RENDER_STACK: usize = 64 << 20;

/// Renders a chat with the model's own template (Jinja, as transformers' `apply_chat_template`
/// with `add_generation_prompt=True`). The template is untrusted: its work is bounded by
/// [`TEMPLATE_FUEL`] and its output by [`TEMPLATE_OUTPUT_LIMIT`].
pub fn render_chat(
    template: &str,
    messages: &[Message],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, RuntimeError> {
    if template.len() > MAX_TEMPLATE_BYTES {
        return Err(text_err(format!(
            "chat template: {} bytes is over the {MAX_TEMPLATE_BYTES}-byte limit",
            template.len()
        )));
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(RENDER_STACK)
            .spawn_scoped(s, || render_chat_on_this_thread(template, messages, bos_token, eos_token))
            .map_err(|e| text_err(format!("chat template: cannot start a thread: {e}")))?
            .join()
            .unwrap_or_else(|_| Err(text_err("chat template: rendering failed")))
    })
}

fn render_chat_on_this_thread(
    template: &str,
    messages: &[Message],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, RuntimeError> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| text_err(format!("chat template: {e}")))?;
    let t = env.get_template("chat").map_err(|e| text_err(format!("chat template: {e}")))?;
    guarded("chat template", || {
        let mut out = LimitedOutput { buf: Vec::new(), over: false };
        let ctx = context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        };
        match t.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(_) if out.over => {
                return Err(text_err(format!(
                    "chat template: the rendered chat is larger than {} MiB",
                    TEMPLATE_OUTPUT_LIMIT >> 20
                )))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(text_err(format!(
                    "chat template: rendering did not finish within {TEMPLATE_FUEL} steps (a runaway loop?)"
                )))
            }
            Err(e) => return Err(text_err(format!("chat template: {e}"))),
        }
        String::from_utf8(out.buf).map_err(|_| text_err("chat template: the rendered chat is not valid UTF-8"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bpe_json(merges: &str, added: &str) -> String {
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{added}],
            "normalizer":null,
            "pre_tokenizer":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}},
            "post_processor":{{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":false,"use_regex":true}},
            "decoder":{{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true}},
            "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
              "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
              "vocab":{{"a":0,"b":1,"c":2,"ab":3,"abc":4,"Ġ":5,"Ġa":6}},
              "merges":{merges}}}}}"#
        )
    }

    /// The typed path builds the tokenizer `tokenizers` builds from the same file: same
    /// serialization (model, added tokens, components), same ids.
    #[test]
    fn fast_bpe_load_equals_the_library_load() {
        let added = r#"{"id":7,"content":"<|end|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                       {"id":0,"content":"a","single_word":false,"lstrip":false,"rstrip":false,"normalized":true,"special":false}"#;
        for merges in [r#"["a b","ab c","Ġ a"]"#, r#"[["a","b"],["ab","c"],["Ġ","a"]]"#] {
            let json = bpe_json(merges, added);
            let fast = load_bpe_fast(json.as_bytes()).expect("a BPE file takes the fast path");
            let slow = Tokenizer::from_bytes(json.as_bytes()).unwrap();
            assert_eq!(fast.to_string(false).unwrap(), slow.to_string(false).unwrap());
            for text in ["abc a<|end|>ab", "cab abc"] {
                let (f, s) = (fast.encode(text, true).unwrap(), slow.encode(text, true).unwrap());
                assert_eq!(f.get_ids(), s.get_ids(), "{text}");
            }
        }
        // an added token whose id the file gives differently is left to the library
        let wrong = r#"{"id":9,"content":"<|end|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}"#;
        assert!(load_bpe_fast(bpe_json(r#"["a b"]"#, wrong).as_bytes()).is_none());
        // a merge that is not two pieces: the library reports it
        let bad = bpe_json(r#"["a b c"]"#, "");
        assert!(load_bpe_fast(bad.as_bytes()).is_none());
        assert!(Tokenizer::from_bytes(bad.as_bytes()).is_err());
        // not BPE, or not a tokenizer at all: the library decides
        assert!(load_bpe_fast(br#"{"version":"1.0","model":{"type":"Unigram","vocab":[]}}"#).is_none());
        assert!(load_bpe_fast(b"[1, 2]").is_none());
    }
}
