//! Drafts a sequence verifies in one pass: the tokens its grammar forces, then guesses from its
//! predicted output, a draft model or prompt lookup.

use std::collections::HashMap;

use super::{token_slot, Engine, Sequence, SequenceId};
use crate::model::{Batch, PassTokens, MAX_DRAFT_PASS_TOKENS, PAGE_SIZE};
use crate::Result;

impl Engine {
    /// Drafts up to `room` tokens for decoding sequence `i` to verify, within its pages' reach:
    /// the tokens its grammar forces (all that fit: they are certain), then up to its draft limit
    /// guessed after them, leaving `others_forced` of the room to the forced tokens of the
    /// sequences after it: from its prediction (moving its cursor), else the draft model's
    /// `model_draft` (drafted after the forced tokens), else by prompt lookup where the engine
    /// does it; cut at the first one its grammar forbids. So a JSON value predicted, drafted or
    /// copied from the prompt is verified in the pass that verifies the key before it.
    pub(super) fn draft_for(&mut self, i: usize, room: usize, forced: Vec<u32>, others_forced: usize, model_draft: Option<Vec<u32>>) {
        if !self.may_draft(&self.running[i]) {
            return;
        }
        let (room, lookup) = (self.draft_room(i, room), self.prompt_lookup);
        let sequence = &mut self.running[i];
        let mut draft = forced;
        draft.truncate(room);
        let max = (room - draft.len()).saturating_sub(others_forced).min(sequence.draft_limit);
        let last_runs = last_tokens(&sequence.tokens, &draft);
        let mut guessed = if let Some((drafted, begin)) = predicted_draft(&last_runs, &sequence.prediction, sequence.prediction_cursor, max) {
            sequence.prediction_cursor = begin;
            drafted
        } else if let Some(mut drafted) = model_draft {
            drafted.truncate(max);
            drafted
        } else if lookup {
            sequence.lookup.draft(&sequence.tokens, &draft, max)
        } else {
            vec![]
        };
        if let (Some(split), Some(_)) = (&sequence.thought, &sequence.answer_constraint) {
            // The token after `</think>` takes the answer's grammar, waiting while the sequence
            // thinks, which a row verifying a guess past it would be chosen without.
            if let Some(end) = guessed.iter().position(|&token| token == split.end_marker()) {
                guessed.truncate(end);
            }
        }
        if let Some(constraint) = sequence.constraint.as_mut().filter(|_| !guessed.is_empty()) {
            // A guess the grammar forbids is never taken: its row and those after it are wasted.
            let allowed = constraint.allowed_run(&[&draft[..], &guessed[..]].concat());
            guessed.truncate(allowed.saturating_sub(draft.len()));
        }
        draft.extend(guessed);
        sequence.draft = draft;
    }

    /// The tokens the grammars of decoding sequences force next (the rest of a JSON schema's
    /// key, a tool call's name), where there are any: drafts the model's masked rows choose, as
    /// the first of them is the only token such a row's mask allows.
    pub(super) fn forced_drafts(&mut self) -> HashMap<SequenceId, Vec<u32>> {
        let decoding = self.running.iter_mut().filter(|s| s.tokens.len() - s.computed == 1);
        decoding
            .filter_map(|s| {
                let forced = s.constraint.as_mut()?.forced_tokens();
                (!forced.is_empty()).then_some((s.id, forced))
            })
            .collect()
    }

    /// The most tokens decoding sequence `i` may draft, within `room`: the positions it may
    /// reach and those within its pages' reach.
    pub(super) fn draft_room(&self, i: usize, room: usize) -> usize {
        let sequence = &self.running[i];
        let positions_left = sequence.max_positions(self.model.context_length()).saturating_sub(sequence.tokens.len() + 1);
        let paged = self.page_reach(i).saturating_sub(sequence.tokens.len());
        room.min(positions_left).min(paged)
    }

    /// Positions running sequence `i` may write without preempting anyone: those of its pages,
    /// taken or reserved, and of one page more while the pool has a page unpromised for every
    /// running sequence and one more each besides (a draft's positions reach into one page at
    /// most, so drafts never take the pages decoding needs).
    pub(super) fn page_reach(&self, i: usize) -> usize {
        let sequence = &self.running[i];
        let spare = self.pages.available() >= 2 * self.running.len();
        (sequence.pages_held() + spare as usize) * PAGE_SIZE
    }

    /// Drafts with the draft model for the decoding sequences that may draft and have no
    /// prediction to draft from, in the room of `room` that the `forced_total` tokens grammars
    /// force leave: a pass that brings each one's keys and values up to its last token and the
    /// tokens its grammar forces after it (`forced`) and gives its first drafted token (a greedy
    /// one), then a one-token pass for each next, fed the argmax of the one before on the GPU.
    /// The same first pass brings the draft model up to the positions the model has computed of
    /// the prompts being prefilled, so that they draft from their first decode step (unless there
    /// is no room to draft now); what does not fit it catches up in later ones. The draft model's
    /// keys and values for drafted tokens stand where they are taken.
    pub(super) async fn draft_with_model(&mut self, room: usize, forced: &HashMap<SequenceId, Vec<u32>>, forced_total: usize) -> Result<HashMap<SequenceId, Vec<u32>>> {
        let Some(draft_model) = &self.draft_model else { return Ok(HashMap::new()) };
        let guess_room = room.saturating_sub(forced_total);
        let mut budget = draft_model.max_batch();
        let ahead = |s: &Sequence| forced.get(&s.id).map_or(&[][..], Vec::as_slice);
        let wants = |s: &Sequence| {
            s.tokens.len() - s.computed == 1 && predicted_draft(&last_tokens(&s.tokens, ahead(s)), &s.prediction, s.prediction_cursor, 1).is_none()
        };
        let mut drafting: Vec<(usize, usize)> = (0..self.running.len())
            .filter(|&i| wants(&self.running[i]))
            .map(|i| (i, self.draft_room(i, room).saturating_sub(ahead(&self.running[i]).len()).min(guess_room).min(self.running[i].draft_limit)))
            .collect();
        drafting.retain(|&(_, max)| max > 0);
        drafting.truncate(guess_room);
        // The same number of passes for all (each one-token pass takes the argmax of every output
        // row of the pass before), their positions within every sequence's reach.
        let context = self.model.context_length();
        let positions_left = drafting
            .iter()
            .map(|&(i, _)| {
                let sequence = &self.running[i];
                (sequence.max_positions(context) + 1).min(self.page_reach(i) + 1) - sequence.tokens.len() - ahead(sequence).len()
            })
            .min();
        let longest = drafting.iter().map(|d| d.1).max().unwrap_or(0);
        let k = longest.min(guess_room / drafting.len().max(1)).min(positions_left.unwrap_or(0));
        let (mut batch, mut ids, mut drafted) = (Batch::default(), vec![], vec![]);
        for (i, max) in drafting {
            let sequence = &self.running[i];
            let forced = ahead(sequence);
            let (first, len) = (sequence.draft_model_computed.min(sequence.computed), sequence.tokens.len() + forced.len());
            let take = (len - first).min(budget);
            if take == 0 {
                continue;
            }
            budget -= take;
            let caught_up = first + take == len;
            // Positions up to the last drafted token's input.
            self.take_pages_through(i, if caught_up { len + k - 2 } else { first + take - 1 });
            catch_up(&mut self.running[i], forced, first..first + take, &mut batch, &mut ids);
            if caught_up {
                batch.outputs.push(batch.slots.len() as u32 - 1);
                drafted.push((i, max.min(k), Vec::with_capacity(k)));
            }
        }
        // Not while too many sequences decode to draft: their prompts catch up when there is room.
        let prefilling = self.running.iter_mut().filter(|s| room > 0 && s.tokens.len() - s.computed > 1);
        for sequence in prefilling {
            let (first, last) = (sequence.draft_model_computed.min(sequence.computed), sequence.computed);
            let take = (last - first).min(budget);
            budget -= take;
            catch_up(sequence, &[], first..first + take, &mut batch, &mut ids);
        }
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let Some(draft_model) = &mut self.draft_model else { return Ok(HashMap::new()) };
        draft_model.submit(&batch, PassTokens::Host(&ids))?;
        if drafted.is_empty() {
            return Ok(HashMap::new());
        }
        for pass in 1..=k {
            // The next pass goes in before this one is read, the GPU busy meanwhile.
            if pass < k {
                let last_input = |i: usize| self.running[i].tokens.len() + ahead(&self.running[i]).len() - 1;
                let next = Batch {
                    slots: drafted.iter().map(|&(i, ..)| token_slot(&self.running[i], last_input(i) + pass)).collect(),
                    outputs: (0..drafted.len() as u32).collect(),
                    top_k: vec![],
                };
                draft_model.submit(&next, PassTokens::Previous)?;
            }
            let output = draft_model.read_pass().await?;
            for ((.., tokens), &token) in drafted.iter_mut().zip(&output.argmax) {
                tokens.push(token);
            }
        }
        let mut drafts = HashMap::new();
        for (i, max, mut tokens) in drafted {
            let forced = ahead(&self.running[i]).len();
            let sequence = &mut self.running[i];
            sequence.draft_model_computed = sequence.tokens.len() + forced + k - 1;
            tokens.truncate(max);
            drafts.insert(sequence.id, tokens);
        }
        Ok(drafts)
    }

    /// The most tokens a pass with drafts holds: one group of GEMV columns.
    pub(super) fn draft_pass_limit(&self) -> usize {
        MAX_DRAFT_PASS_TOKENS.min(self.model.gpu().gemv_max_tokens as usize)
    }

    /// Whether `sequence` may draft tokens to verify (and so reads each token before its next pass).
    pub(super) fn may_draft(&self, sequence: &Sequence) -> bool {
        self.prompt_lookup || self.draft_model.is_some() || !sequence.prediction.is_empty() || sequence.constraint.is_some()
    }

}

/// The shortest and longest runs of a sequence's last tokens that prompt lookup matches.
pub(super) const LOOKUP_NGRAM: std::ops::RangeInclusive<usize> = 2..=4;

/// The last tokens of `tokens` followed by `ahead`, as many as the longest run prompt lookup
/// matches.
fn last_tokens(tokens: &[u32], ahead: &[u32]) -> Vec<u32> {
    let n = *LOOKUP_NGRAM.end();
    let from_tokens = n.saturating_sub(ahead.len()).min(tokens.len());
    let mut last = tokens[tokens.len() - from_tokens..].to_vec();
    last.extend_from_slice(&ahead[ahead.len().saturating_sub(n)..]);
    last
}

/// Where `find` locates the longest run of `tokens`' last tokens (LOOKUP_NGRAM long), and how
/// long that run is.
fn longest_match(tokens: &[u32], mut find: impl FnMut(&[u32]) -> Option<usize>) -> Option<(usize, usize)> {
    LOOKUP_NGRAM.rev().filter(|&n| n <= tokens.len()).find_map(|n| find(&tokens[tokens.len() - n..]).map(|start| (start, n)))
}

/// Where each run of 2-4 tokens of a sequence last began, for prompt lookup (vLLM's `ngram`
/// speculation, llama.cpp's lookup decoding) in constant time a token: a scan of the whole
/// sequence took 0.2 ms a step at 128K tokens on a 2-core machine; indexing 128K tokens takes
/// 23 ms, once, at the first lookup. About 75 bytes a token.
#[derive(Default)]
pub(super) struct LookupIndex {
    /// Each run, padded with an id no vocabulary has, and where it last began.
    latest: ahash::AHashMap<[u32; 4], u32>,
    /// For each run length, the first start not indexed yet.
    next_start: [usize; 3],
}

impl LookupIndex {
    /// Up to `max` tokens that followed the latest earlier occurrence in `tokens` of the last ones
    /// of `tokens` and then `ahead` (tokens drafted already, not indexed), the longest such run
    /// first (4 tokens down to 2). A match that runs into the end goes on as the repetition it is
    /// in. `tokens` only grows from one call to the next.
    fn draft(&mut self, tokens: &[u32], ahead: &[u32], max: usize) -> Vec<u32> {
        let len = tokens.len();
        for (n, next) in LOOKUP_NGRAM.zip(&mut self.next_start) {
            // Every run that begins before the last one of its length.
            while *next + n < len {
                self.latest.insert(run_key(&tokens[*next..*next + n]), *next as u32);
                *next += 1;
            }
        }
        let last_runs = last_tokens(tokens, ahead);
        let Some((start, n)) = longest_match(&last_runs, |run| self.latest.get(&run_key(run)).map(|&start| start as usize)).filter(|_| max > 0) else { return vec![] };
        // What follows the match in tokens, ahead and the draft so far.
        let end = len + ahead.len();
        let mut draft = Vec::with_capacity(max);
        for k in start + n..start + n + max {
            draft.push(match k {
                k if k < len => tokens[k],
                k if k < end => ahead[k - len],
                k => draft[k - end],
            });
        }
        draft
    }
}

fn run_key(run: &[u32]) -> [u32; 4] {
    let mut key = [u32::MAX; 4];
    key[..run.len()].copy_from_slice(run);
    key
}

/// A draft from a `prediction` (the prompt's last tokens, then the predicted output): up to `max`
/// tokens after the first occurrence from `cursor` on of the longest run of `tokens`' last ones
/// (else after its first occurrence anywhere), and where that draft begins, the next cursor. The
/// output goes through the prediction in order, leaving it where it differs and coming back.
fn predicted_draft(tokens: &[u32], prediction: &[u32], cursor: usize, max: usize) -> Option<(Vec<u32>, usize)> {
    let occurs_at = |run: &[u32], p: usize| prediction.get(p..p + run.len()) == Some(run) && p + run.len() < prediction.len();
    let first = |run: &[u32]| {
        let from = cursor.saturating_sub(run.len());
        (from..prediction.len()).chain(0..from).find(|&p| occurs_at(run, p))
    };
    let (start, n) = longest_match(tokens, first).filter(|_| max > 0)?;
    let begin = start + n;
    Some((prediction[begin..(begin + max).min(prediction.len())].to_vec(), begin))
}

/// Adds `sequence`'s `positions` (in pages it holds) to the draft model's `batch` and their
/// tokens (its own, then `ahead` of them) to `ids`; its keys and values are computed through them
/// after the pass.
fn catch_up(sequence: &mut Sequence, ahead: &[u32], positions: std::ops::Range<usize>, batch: &mut Batch, ids: &mut Vec<u32>) {
    let len = sequence.tokens.len();
    ids.extend(positions.clone().map(|position| if position < len { sequence.tokens[position] } else { ahead[position - len] }));
    sequence.draft_model_computed = positions.end;
    batch.slots.extend(positions.map(|position| token_slot(sequence, position)));
}

#[cfg(test)]
mod tests {
    use super::{longest_match, predicted_draft, LookupIndex};

    fn prompt_lookup(tokens: &[u32], max: usize) -> Vec<u32> {
        LookupIndex::default().draft(tokens, &[], max)
    }

    /// Prompt lookup by scanning `tokens` (latest occurrence first) for the last tokens of
    /// `tokens` and then `ahead`.
    fn scanned_lookup(tokens: &[u32], ahead: &[u32], max: usize) -> Vec<u32> {
        let sequence = [tokens, ahead].concat();
        let len = sequence.len();
        let earlier = |run: &[u32]| (0..tokens.len().saturating_sub(run.len())).rev().find(|&p| &tokens[p..p + run.len()] == run);
        let Some((start, n)) = longest_match(&sequence, earlier).filter(|_| max > 0) else { return vec![] };
        let continued = |k: usize| sequence[start + n + k % (len - start - n)];
        (0..max).map(continued).collect()
    }

    #[test]
    fn prompt_lookup_drafts_what_followed_the_latest_longest_match() {
        // "3 4" last came before 9; "2 3 4" (longer) came before 5.
        assert_eq!(prompt_lookup(&[1, 2, 3, 4, 5, 6, 3, 4, 9, 2, 3, 4], 3), [5, 6, 3]);
        assert_eq!(prompt_lookup(&[7, 3, 4, 9, 1, 3, 4], 2), [9, 1]);
        // Running into the end goes on with the repetition: period 2.
        assert_eq!(prompt_lookup(&[8, 5, 6, 5, 6], 5), [5, 6, 5, 6, 5]);
        // After tokens drafted already ("3 4" forced by a grammar): what followed "2 3 4", then
        // the tokens ahead as the repetition goes on.
        assert_eq!(LookupIndex::default().draft(&[2, 3, 4, 5, 6, 2], &[3, 4], 4), [5, 6, 2, 3]);
        assert_eq!(prompt_lookup(&[1, 2, 3, 4], 4), Vec::<u32>::new());
        assert_eq!(prompt_lookup(&[1, 2, 1, 2], 0), Vec::<u32>::new());
    }

    /// Random sequences over 3 tokens (many matches): every draft follows a match of the last 2-4
    /// tokens, as long as asked for (a prediction's: as far as it goes), and nothing panics.
    #[test]
    fn drafts_follow_a_match_of_the_last_tokens() {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut random = |n: usize| (0..n).map(|_| rng.next_u32() % 3).collect::<Vec<u32>>();
        let ends_with_run_before = |tokens: &[u32], within: &[u32], at: usize| {
            (2..=4).any(|n| n <= at && n <= tokens.len() && within[at - n..at] == tokens[tokens.len() - n..])
        };
        for case in 0..2000 {
            let (tokens, prediction) = (random(1 + case % 13), random(case % 11));
            let max = case % 7;
            let drafted = prompt_lookup(&tokens, max);
            assert!(drafted.is_empty() || drafted.len() == max, "{tokens:?}: {drafted:?}");
            assert_eq!(drafted, scanned_lookup(&tokens, &[], max), "{tokens:?}");
            if let Some((draft, begin)) = predicted_draft(&tokens, &prediction, case % 12, max) {
                assert!(!draft.is_empty() && draft.len() <= max && draft[..] == prediction[begin..begin + draft.len()], "{tokens:?} {prediction:?}");
                assert!(ends_with_run_before(&tokens, &prediction, begin), "{tokens:?} {prediction:?} at {begin}");
            }
        }
    }

    /// An index kept as a sequence grows drafts what a scan of the whole sequence finds, at every
    /// length (over 5 tokens: many matches; over 1,000: few), also after tokens drafted ahead
    /// (which it does not index).
    #[test]
    fn a_growing_lookup_index_drafts_what_a_scan_finds() {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for vocabulary in [5, 1000] {
            let (mut index, mut tokens) = (LookupIndex::default(), vec![]);
            for step in 0..3000 {
                tokens.push(rng.next_u32() % vocabulary);
                let ahead: Vec<u32> = (0..step % 6).map(|_| rng.next_u32() % vocabulary).collect();
                let max = step % 7;
                assert_eq!(index.draft(&tokens, &ahead, max), scanned_lookup(&tokens, &ahead, max), "{vocabulary} tokens, step {step}, {ahead:?} ahead");
            }
        }
    }

    #[test]
    fn a_prediction_is_drafted_in_order_from_where_the_output_stands() {
        // The prompt's last tokens (10, 11, 12), then the prediction.
        let prediction = [10, 11, 12, 1, 2, 3, 1, 2, 4, 5];
        // At the start: the output's first token follows the prompt.
        assert_eq!(predicted_draft(&[9, 10, 11, 12, 1], &prediction, 0, 3), Some((vec![2, 3, 1], 4)));
        // The longest run decides; "1 2" is twice in it: the first from the cursor on counts.
        assert_eq!(predicted_draft(&[12, 1, 2, 3, 1, 2], &prediction, 4, 2), Some((vec![4, 5], 8)));
        assert_eq!(predicted_draft(&[7, 1, 2], &prediction, 4, 2), Some((vec![3, 1], 5)));
        assert_eq!(predicted_draft(&[7, 1, 2], &prediction, 7, 2), Some((vec![4, 5], 8)));
        // Behind the cursor only as a last resort; nothing past the prediction's end.
        assert_eq!(predicted_draft(&[7, 11, 12], &prediction, 9, 4), Some((vec![1, 2, 3, 1], 3)));
        assert_eq!(predicted_draft(&[4, 5], &prediction, 9, 4), None);
        assert_eq!(predicted_draft(&[6, 7], &prediction, 0, 4), None);
    }

}
