//! Text in and out: the HF tokenizer plus the model's own chat template, rendered with
//! minijinja (with Python string methods, which HF templates call).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Token ids that end generation (EOS and the template's end-of-turn token).
    stop_ids: Vec<u32>,
}

impl TextTokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let mut stop_ids: Vec<u32> = [eos_token.as_deref(), Some("<|im_end|>"), Some("<|eot_id|>")]
            .into_iter()
            .flatten()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        stop_ids.dedup();
        Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            stop_ids,
        }
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text as it stands (special tokens in the text are recognised, none are added:
    /// the chat template already placed them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text of one token as the vocabulary spells it, for logprob listings.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_default()
    }

    /// Renders the chat template with `add_generation_prompt`; a model without a template
    /// gets ChatML, the most common format among small instruct models.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let source = self.chat_template.as_deref().unwrap_or(CHATML);
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", source)
            .map_err(|e| Error::Template(e.to_string()))?;
        let template = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| Error::Template(e.to_string()))
    }
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Turns generated ids into text piece by piece, with the tokenizers crate's `DecodeStream`
/// step: text is released once it decodes cleanly (a byte-level BPE token can end inside a
/// UTF-8 character), and each step decodes only a short window, not the whole response.
/// (`DecodeStream` itself borrows the tokenizer; its step function keeps the state here, so a
/// sequence can own its decoder.)
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl IncrementalDecoder {
    /// Adds a token and returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        let new = tokenizers::tokenizer::step_decode_stream(
            &tok.inner,
            vec![id],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(new.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_text_is_the_whole_decode_even_inside_multibyte_characters() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-qwen2/tokenizer.json"
        );
        let tok = TextTokenizer::new(
            tokenizers::Tokenizer::from_file(path).unwrap(),
            None,
            None,
            None,
        );
        let text = "Grüße, 世界 🙂: 12 + 7 = 19.";
        let ids = tok.encode(text).unwrap();
        let mut decoder = IncrementalDecoder::default();
        let mut streamed = String::new();
        let mut held_back = false;
        for &id in &ids {
            let piece = decoder.push(&tok, id).unwrap();
            held_back |= piece.is_empty();
            streamed.push_str(&piece);
        }
        assert_eq!(streamed, tok.decode(&ids).unwrap());
        assert_eq!(streamed, text);
        assert!(
            held_back,
            "some token ends inside a character and is held back"
        );
    }
}
