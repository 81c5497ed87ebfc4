//! A reasoning model's thought told apart from its answer. DeepSeek-R1's distilled Llamas (and
//! other Llama-architecture `<think>` models) write `<think>` ... `</think>` before they answer,
//! and their newer templates open the thought at the end of the prompt. As vLLM's `deepseek_r1`
//! reasoning parser does, the markers are told apart by their ids, so both must be single tokens
//! of the vocabulary; a model whose template never speaks of thoughts gets no parsing.

use super::Tokenizer;

pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// The ids of a model's thought markers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinkTokens {
    pub start: u32,
    pub end: u32,
}

impl ThinkTokens {
    /// The markers of a model whose template speaks of thoughts and whose vocabulary has both as
    /// tokens of their own.
    pub fn detect(template_source: &str, tokenizer: &Tokenizer) -> Option<Self> {
        if !template_source.contains(THINK_START) && !template_source.contains(THINK_END) {
            return None;
        }
        Some(Self { start: tokenizer.token_id(THINK_START)?, end: tokenizer.token_id(THINK_END)? })
    }

    /// Whether `prompt` leaves a thought open: its last token, whitespace after it aside, is the
    /// start marker (DeepSeek-R1's template ends with `<think>\n`).
    pub fn opened_by(&self, prompt: &[u32], tokenizer: &Tokenizer) -> bool {
        let is_space = |id: u32| tokenizer.decode(&[id], false).is_ok_and(|text| !text.is_empty() && text.trim().is_empty());
        prompt.iter().rev().find(|&&id| !is_space(id)) == Some(&self.start)
    }
}

/// What a generated token is in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// A marker that begins the thought; its text is neither thought nor answer.
    ThoughtBegins,
    /// A marker that ends the thought; the answer follows.
    ThoughtEnds,
    Thought,
    Answer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing generated yet: a thought may begin.
    Start,
    Thought,
    Answer { after_thought: bool },
}

/// Follows one output through its thought and its answer, token by token.
#[derive(Clone, Debug)]
pub struct ThoughtSplit {
    markers: ThinkTokens,
    phase: Phase,
    /// The answer's text so far is only whitespace (what follows `</think>` before the answer).
    answer_blank: bool,
}

impl ThoughtSplit {
    /// A split for an output whose prompt left a thought open (`open`), or where one may begin.
    pub fn new(markers: ThinkTokens, open: bool) -> Self {
        Self { markers, phase: if open { Phase::Thought } else { Phase::Start }, answer_blank: true }
    }

    /// Which part `token`, the next of the output, is.
    pub fn next(&mut self, token: u32) -> Part {
        match self.phase {
            Phase::Start if token == self.markers.start => {
                self.phase = Phase::Thought;
                Part::ThoughtBegins
            }
            Phase::Thought if token == self.markers.end => {
                self.phase = Phase::Answer { after_thought: true };
                Part::ThoughtEnds
            }
            Phase::Thought => Part::Thought,
            Phase::Start => {
                self.phase = Phase::Answer { after_thought: false };
                Part::Answer
            }
            Phase::Answer { .. } => Part::Answer,
        }
    }

    /// Whether the output is in its thought.
    pub fn thinking(&self) -> bool {
        self.phase == Phase::Thought
    }

    /// Whether a thought began.
    pub fn thought(&self) -> bool {
        matches!(self.phase, Phase::Thought | Phase::Answer { after_thought: true })
    }

    /// The token that would begin a thought, while one still may (nothing generated yet).
    pub fn may_begin(&self) -> Option<u32> {
        (self.phase == Phase::Start).then_some(self.markers.start)
    }

    /// The token that would end the thought.
    pub fn end_marker(&self) -> u32 {
        self.markers.end
    }

    /// Answer text as it is released: the whitespace between `</think>` and the answer is left out.
    pub fn answer_text(&mut self, text: String) -> String {
        if !self.answer_blank || self.phase != (Phase::Answer { after_thought: true }) {
            return text;
        }
        let trimmed = text.trim_start();
        self.answer_blank = trimmed.is_empty();
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKERS: ThinkTokens = ThinkTokens { start: 7, end: 8 };

    #[test]
    fn an_open_thought_runs_to_its_end_marker() {
        let mut split = ThoughtSplit::new(MARKERS, true);
        assert!(split.thinking() && split.thought());
        assert_eq!([1, 7, 2, 8, 3, 8].map(|t| split.next(t)), [Part::Thought, Part::Thought, Part::Thought, Part::ThoughtEnds, Part::Answer, Part::Answer]);
        assert!(!split.thinking() && split.thought());
        assert_eq!(split.answer_text("\n\n".into()), "");
        assert_eq!(split.answer_text(" Hi ".into()), "Hi ");
        assert_eq!(split.answer_text(" there".into()), " there");
    }

    #[test]
    fn a_thought_begins_only_at_the_start() {
        let mut split = ThoughtSplit::new(MARKERS, false);
        assert!(!split.thinking() && split.may_begin() == Some(7));
        assert_eq!([7, 1, 8, 2].map(|t| split.next(t)), [Part::ThoughtBegins, Part::Thought, Part::ThoughtEnds, Part::Answer]);
        let mut split = ThoughtSplit::new(MARKERS, false);
        assert_eq!([1, 7, 8].map(|t| split.next(t)), [Part::Answer; 3]);
        assert!(!split.thought() && split.may_begin().is_none());
        // Without a thought, the answer keeps its leading whitespace.
        assert_eq!(split.answer_text(" x".into()), " x");
    }
}
