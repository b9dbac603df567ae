//! The message contract: a persistence request (seed 000 "Input Schema"), its validation, and the
//! result event (seed 000 "Output Schema").

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Limits that keep one request from bloating rows or transactions.
pub mod limits {
    pub const MAX_ID_CHARS: usize = 255;
    pub const MAX_SHORT_TEXT_CHARS: usize = 255;
    pub const MAX_JUSTIFICATION_CHARS: usize = 10_000;
    pub const MAX_BOOKS: usize = 100;
    pub const MAX_LIST_ITEMS: usize = 100;
    pub const MAX_LIST_ITEM_CHARS: usize = 1_000;
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceRequest {
    // Defaulted so a missing field is reported by validation with a precise reason.
    #[serde(default)]
    pub user_id: String,
    pub context: ReaderContext,
    #[serde(default)]
    pub justified_books: Vec<JustifiedBook>,
    pub metadata: RequestMetadata,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReaderContext {
    #[serde(default)]
    pub mood: String,
    #[serde(default)]
    pub profile: String,
    #[serde(default)]
    pub interests: Vec<String>,
    #[serde(default)]
    pub intent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferences: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JustifiedBook {
    #[serde(default)]
    pub book_id: String,
    pub score: f64,
    #[serde(default)]
    pub justification: String,
    #[serde(default)]
    pub key_reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_breakdown: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata {
    #[serde(default)]
    pub processing_time: Option<i64>,
    #[serde(default)]
    pub agents_used: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("{0} is missing or empty")]
    Missing(&'static str),
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} has more than {max} items")]
    TooMany { field: &'static str, max: usize },
    #[error("justifiedBooks is empty")]
    NoBooks,
    #[error("score of book {book_id} is {score}, outside 0..1")]
    ScoreOutOfRange { book_id: String, score: f64 },
    #[error("book {0} appears more than once")]
    DuplicateBook(String),
    #[error("processingTime is negative")]
    NegativeProcessingTime,
    #[error("{0} must be a JSON object")]
    NotAnObject(&'static str),
}

impl ValidationError {
    /// Stable code for result events and metrics; bounded set.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing_field",
            Self::TooLong { .. } => "field_too_long",
            Self::TooMany { .. } => "too_many_items",
            Self::NoBooks => "no_books",
            Self::ScoreOutOfRange { .. } => "score_out_of_range",
            Self::DuplicateBook(_) => "duplicate_book",
            Self::NegativeProcessingTime => "negative_processing_time",
            Self::NotAnObject(_) => "not_an_object",
        }
    }
}

fn text(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::Missing(field));
    }
    if value.chars().count() > max {
        return Err(ValidationError::TooLong { field, max });
    }
    Ok(())
}

fn list(field: &'static str, items: &[String]) -> Result<(), ValidationError> {
    use limits::*;
    if items.len() > MAX_LIST_ITEMS {
        return Err(ValidationError::TooMany {
            field,
            max: MAX_LIST_ITEMS,
        });
    }
    match items
        .iter()
        .any(|i| i.chars().count() > MAX_LIST_ITEM_CHARS)
    {
        true => Err(ValidationError::TooLong {
            field,
            max: MAX_LIST_ITEM_CHARS,
        }),
        false => Ok(()),
    }
}

fn object(field: &'static str, v: &Option<Json>) -> Result<(), ValidationError> {
    match v {
        None | Some(Json::Object(_)) => Ok(()),
        Some(_) => Err(ValidationError::NotAnObject(field)),
    }
}

impl PersistenceRequest {
    pub fn validate(&self) -> Result<(), ValidationError> {
        use limits::*;
        text("userId", &self.user_id, MAX_ID_CHARS)?;
        let c = &self.context;
        text("context.mood", &c.mood, MAX_SHORT_TEXT_CHARS)?;
        text("context.profile", &c.profile, MAX_SHORT_TEXT_CHARS)?;
        text("context.intent", &c.intent, MAX_SHORT_TEXT_CHARS)?;
        list("context.interests", &c.interests)?;
        object("context.preferences", &c.preferences)?;
        self.validate_books()?;
        let m = &self.metadata;
        if m.processing_time.is_some_and(|t| t < 0) {
            return Err(ValidationError::NegativeProcessingTime);
        }
        list("metadata.agentsUsed", &m.agents_used)?;
        list("metadata.errors", m.errors.as_deref().unwrap_or_default())?;
        if let Some(id) = &m.request_id {
            text("metadata.requestId", id, MAX_ID_CHARS)?;
        }
        Ok(())
    }

    fn validate_books(&self) -> Result<(), ValidationError> {
        use limits::*;
        let books = &self.justified_books;
        if books.is_empty() {
            return Err(ValidationError::NoBooks);
        }
        if books.len() > MAX_BOOKS {
            return Err(ValidationError::TooMany {
                field: "justifiedBooks",
                max: MAX_BOOKS,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(books.len());
        for b in books {
            text("justifiedBooks.bookId", &b.book_id, MAX_ID_CHARS)?;
            text(
                "justifiedBooks.justification",
                &b.justification,
                MAX_JUSTIFICATION_CHARS,
            )?;
            list("justifiedBooks.keyReasons", &b.key_reasons)?;
            object("justifiedBooks.scoreBreakdown", &b.score_breakdown)?;
            if !(b.score.is_finite() && (0.0..=1.0).contains(&b.score)) {
                return Err(ValidationError::ScoreOutOfRange {
                    book_id: b.book_id.clone(),
                    score: b.score,
                });
            }
            if !seen.insert(b.book_id.as_str()) {
                return Err(ValidationError::DuplicateBook(b.book_id.clone()));
            }
        }
        Ok(())
    }

    /// Mean book score rounded to 2 decimals (seed 000 step 3); 0 for no books.
    pub fn total_score(&self) -> f64 {
        let n = self.justified_books.len();
        if n == 0 {
            return 0.0;
        }
        round2(self.justified_books.iter().map(|b| b.score).sum::<f64>() / n as f64)
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `persistenceStatus` values of the result event.
pub mod status {
    pub const SUCCESS: &str = "success";
    /// Forwarded to a delayed retry tier; `routing` says which and when it is due.
    pub const RETRY_SCHEDULED: &str = "retry_scheduled";
    /// Forwarded to the dead-letter topic; `error` says why.
    pub const DEAD_LETTERED: &str = "dead_lettered";
}

/// The confirmation published on the results topic (schemas/persistence_result.avsc).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceResult {
    pub request_id: String,
    pub user_id: Option<String>,
    pub recommendation_id: Option<String>,
    pub context_id: Option<String>,
    pub book_count: i32,
    pub persistence_status: String,
    pub timestamp: String,
    pub persistence_metadata: Option<PersistenceMetadata>,
    pub error: Option<ResultError>,
    /// Where a failed request went: a retry tier or the dead-letter topic.
    #[serde(default)]
    pub routing: Option<Routing>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    pub topic: String,
    /// Tier name (`5m`, `30m`, `2h`); None for the dead-letter topic.
    pub tier: Option<String>,
    /// Failed attempts so far, this one included.
    pub attempt: i32,
    /// RFC 3339, UTC: when the tier hands the request back; None for the dead-letter topic.
    pub due_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceMetadata {
    pub transaction_id: String,
    pub persistence_time: i64,
    pub records_created: i32,
    pub books_linked: i32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ResultError {
    pub class: String,
    pub code: String,
    pub message: String,
}

/// `s` cut to `max_chars` characters, marked with an ellipsis when cut.
pub fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> PersistenceRequest {
        serde_json::from_value(serde_json::json!({
            "userId": "user-123",
            "context": {"mood": "reflexivo", "profile": "avanzado",
                        "interests": ["filosofía"], "intent": "aprendizaje"},
            "justifiedBooks": [
                {"bookId": "book-101", "score": 0.944, "justification": "j", "keyReasons": ["a"]},
                {"bookId": "book-102", "score": 0.5, "justification": "j"}
            ],
            "metadata": {"processingTime": 8500, "agentsUsed": ["context"], "requestId": "req-1"}
        }))
        .unwrap()
    }

    #[test]
    fn accepts_seed_example_and_rounds_mean() {
        let r = sample();
        assert_eq!(r.validate(), Ok(()));
        assert_eq!(r.total_score(), 0.72);
    }

    #[test]
    fn rejects_score_outside_unit_interval() {
        let mut r = sample();
        r.justified_books[0].score = 1.5;
        assert_eq!(r.validate().unwrap_err().code(), "score_out_of_range");
        r.justified_books[0].score = f64::NAN;
        assert_eq!(r.validate().unwrap_err().code(), "score_out_of_range");
    }

    #[test]
    fn rejects_duplicate_books_empty_books_and_missing_user() {
        let mut r = sample();
        r.justified_books[1].book_id = "book-101".into();
        assert_eq!(
            r.validate(),
            Err(ValidationError::DuplicateBook("book-101".into()))
        );
        r.justified_books.clear();
        assert_eq!(r.validate(), Err(ValidationError::NoBooks));
        let mut r = sample();
        r.user_id = " ".into();
        assert_eq!(r.validate(), Err(ValidationError::Missing("userId")));
        let mut r = sample();
        r.context.mood.clear();
        assert_eq!(r.validate(), Err(ValidationError::Missing("context.mood")));
    }

    #[test]
    fn rejects_oversize_strings() {
        let mut r = sample();
        r.justified_books[0].justification = "x".repeat(limits::MAX_JUSTIFICATION_CHARS + 1);
        assert_eq!(r.validate().unwrap_err().code(), "field_too_long");
    }
}
