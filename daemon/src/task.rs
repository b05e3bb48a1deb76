//! A task whose answers can be checked: the execution-feedback loop of the
//! Llama 3 recipe, in miniature. A response is correct when the last integer
//! in it equals the reference answer; the gap between two wrong answers sets
//! how much better the closer one is.

/// The last (possibly negative) integer in `text`.
pub fn extract_answer(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let mut i = bytes.len();
    while i > 0 {
        i -= 1;
        if bytes[i].is_ascii_digit() {
            let end = i + 1;
            let mut start = i;
            while start > 0 && bytes[start - 1].is_ascii_digit() {
                start -= 1;
            }
            let neg = start > 0 && bytes[start - 1] == b'-';
            let digits = &text[start..end];
            let n: i64 = digits.parse().ok()?;
            return Some(if neg { -n } else { n });
        }
    }
    None
}

pub fn parse_answer(answer: &str) -> Option<i64> {
    answer.trim().parse().ok()
}

/// Is `response` correct for `answer`?
pub fn is_correct(response: &str, answer: &str) -> bool {
    match (extract_answer(response), parse_answer(answer)) {
        (Some(a), Some(b)) => a == b,
        _ => response.trim() == answer.trim(),
    }
}

/// How far off a response is (0 = correct; None = no answer in it).
pub fn distance(response: &str, answer: &str) -> Option<u64> {
    Some(extract_answer(response)?.abs_diff(parse_answer(answer)?))
}

/// The corrected response an annotator would write.
pub fn corrected(answer: &str) -> String {
    format!("The answer is {}.", answer.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_extracted_and_checked() {
        assert_eq!(extract_answer("17 + 25 = 42"), Some(42));
        assert_eq!(extract_answer("The answer is -7."), Some(-7));
        assert_eq!(extract_answer("no digits"), None);
        assert!(is_correct("The answer is 42.", "42"));
        assert!(!is_correct("The answer is 43.", "42"));
        assert_eq!(distance("The answer is 40.", "42"), Some(2));
    }
}
