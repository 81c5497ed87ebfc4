//! Stop strings matched as the text comes.

/// Holds back text that may be the start of a stop string, and cuts the output at the first one.
/// Each stop string is matched as the text comes (Knuth-Morris-Pratt), so a token costs as much
/// however long the stop strings and the held-back text are: a request's stop strings, up to the
/// body's size, cannot slow the engine every sequence shares.
pub(crate) struct StopStrings {
    stops: Vec<StopString>,
    pending: String,
    stopped: bool,
}

struct StopString {
    bytes: Vec<u8>,
    /// fallback[i]: the length of the longest proper prefix of bytes[..=i] that also ends it.
    fallback: Vec<usize>,
    /// Bytes of the stop string the text seen so far ends with.
    matched: usize,
}

impl StopString {
    fn new(stop: String) -> Self {
        let bytes = stop.into_bytes();
        let mut fallback = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fallback[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        Self { bytes, fallback, matched: 0 }
    }

    /// Takes the text's next byte; whether the stop string ends with it.
    fn step(&mut self, byte: u8) -> bool {
        while self.matched > 0 && self.bytes[self.matched] != byte {
            self.matched = self.fallback[self.matched - 1];
        }
        if self.bytes[self.matched] == byte {
            self.matched += 1;
        }
        self.matched == self.bytes.len()
    }
}

impl StopStrings {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).map(StopString::new).collect();
        Self { stops, pending: String::new(), stopped: false }
    }

    /// Adds generated text; returns what is safe to emit and whether a stop string was found.
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        let old = self.pending.len();
        self.pending.push_str(text);
        // The earliest start among the stop strings the new text completes. Each begins in the
        // pending text: what was emitted ends with no start of a stop string.
        let mut cut: Option<usize> = None;
        for stop in &mut self.stops {
            if let Some(end) = self.pending.as_bytes()[old..].iter().position(|&byte| stop.step(byte)) {
                let begins = old + end + 1 - stop.bytes.len();
                cut = Some(cut.map_or(begins, |cut| cut.min(begins)));
            }
        }
        if let Some(cut) = cut {
            self.stopped = true;
            let emit = self.pending[..cut].to_string();
            self.pending.clear();
            return (emit, true);
        }
        // The longest end that could still grow into a stop string stays pending (it starts at a
        // character: a stop string's first byte is a character's first).
        let held = self.stops.iter().map(|stop| stop.matched).max().unwrap_or(0);
        let emit: String = self.pending.drain(..self.pending.len() - held).collect();
        (emit, false)
    }

    /// Whether a stop string cut the output.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }

    /// The held-back text plus `tail`, when generation ends for another reason.
    pub(crate) fn flush(&mut self, tail: &str) -> String {
        self.pending.push_str(tail);
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    /// What `stops` let through of `pieces`, pushed one at a time, and whether one of them cut it.
    fn through(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut stop_strings = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut emitted = vec![];
        for piece in pieces {
            let (emit, stopped) = stop_strings.push(piece);
            emitted.push(emit);
            if stopped {
                return (emitted, true);
            }
        }
        emitted.push(stop_strings.flush(""));
        (emitted, false)
    }

    #[test]
    fn stop_strings_hold_what_may_begin_one_and_cut_at_the_first() {
        // Held while it may be a stop string, released once it cannot be.
        assert_eq!(through(&["User:"], &["Hi ", "Us", "ed", " it"]), (vec!["Hi ".into(), "".into(), "Used".into(), " it".into(), "".into()], false));
        // Cut across pieces, at the earliest stop string the completing piece holds; one that
        // began earlier but is not complete yet is not awaited.
        assert_eq!(through(&["User:", "er"], &["a U", "se", "r: b"]), (vec!["a ".into(), "".into(), "".into()], true));
        assert_eq!(through(&["User:", "er"], &["a U", "ser", ": b"]), (vec!["a ".into(), "Us".into()], true));
        assert_eq!(through(&["aab"], &["aa", "aa", "b!"]), (vec!["".into(), "aa".into(), "".into()], true));
        // Characters of several bytes, a stop string inside one piece, and none at all.
        assert_eq!(through(&["天気"], &["Grüße 天", "気 x"]), (vec!["Grüße ".into(), "".into()], true));
        assert_eq!(through(&[""], &["a", "b"]), (vec!["a".into(), "b".into(), "".into()], false));
    }

    #[test]
    fn a_long_stop_string_keeps_what_may_still_be_it() {
        // 100,000 bytes that match all but the end of a stop string are held, and released whole
        // by the byte that rules it out (each piece is matched once, not the held text again).
        let stop = format!("{}c", "a".repeat(100_000));
        let mut pieces = vec!["a".repeat(100); 1000];
        pieces.push("b".to_string());
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let (emitted, stopped) = through(&[stop.as_str()], &pieces);
        assert!(!stopped);
        assert!(emitted[..1000].iter().all(String::is_empty));
        assert_eq!(emitted[1000], format!("{}b", "a".repeat(100_000)));
    }
}
