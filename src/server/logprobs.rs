//! Log-prob listings in the chat and the legacy completions layouts.

use std::collections::HashMap;

use super::openai::{ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob};
use crate::model::TextTokenizer;
use crate::sampling::SampledToken;

pub fn chat(tok: &TextTokenizer, tokens: &[SampledToken]) -> ChoiceLogprobs {
    ChoiceLogprobs {
        content: tokens
            .iter()
            .map(|t| {
                let text = tok.token_text(t.id);
                TokenLogprob {
                    bytes: text.as_bytes().to_vec(),
                    token: text,
                    logprob: t.logprob,
                    top_logprobs: t
                        .top
                        .iter()
                        .map(|&(id, logprob)| {
                            let token = tok.token_text(id);
                            TopLogprob {
                                bytes: token.as_bytes().to_vec(),
                                token,
                                logprob,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// `text_offset` counts bytes from the start of the returned text, starting at `offset`.
pub fn completion(
    tok: &TextTokenizer,
    tokens: &[SampledToken],
    offset: usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut pos = offset;
    for t in tokens {
        let text = tok.token_text(t.id);
        out.text_offset.push(pos);
        pos += text.len();
        out.tokens.push(text);
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(
            t.top
                .iter()
                .map(|&(id, lp)| (tok.token_text(id), lp))
                .collect::<HashMap<_, _>>(),
        );
    }
    out
}
