//! Entries rendered as JSON straight from the store's [`Entry`], without
//! building the owned [`EntryBody`](super::types::EntryBody) the client reads:
//! a range page renders up to 1000 of them, and each owned body cost four
//! allocations and a trip through chrono's general formatter.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Datelike as _, SecondsFormat, Timelike as _};
use serde::{Serialize, Serializer};

use super::types::lease_text;
use crate::storage::{Change, Entry, Event, LeaseId};

/// An entry as the API shows it, borrowed from the store's entry. It renders
/// exactly as an `EntryBody` with the same content: `value` when the bytes are
/// UTF-8, else `value_base64`; neither for a keys-only listing.
#[derive(Serialize)]
pub struct EntryView<'a> {
    key: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    version: u64,
    revision: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseText>,
}

impl<'a> EntryView<'a> {
    /// The entry as the API shows it; `keys_only` leaves its value out.
    pub fn new(entry: &'a Entry, keys_only: bool) -> Self {
        let (value, value_base64) = if keys_only {
            (None, None)
        } else {
            text_or_base64(&entry.value)
        };
        EntryView {
            // Keys are checked to be UTF-8 before they are stored.
            key: String::from_utf8_lossy(&entry.key),
            value,
            value_base64,
            version: entry.version,
            revision: entry.revision,
            created_at: Timestamp(entry.created_at_us),
            updated_at: Timestamp(entry.updated_at_us),
            expires_at: entry.expires_at_us.map(Timestamp),
            lease: entry.lease.map(LeaseText),
        }
    }
}

/// A lease id, rendered as the API writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseText(LeaseId);

impl Serialize for LeaseText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&lease_text(self.0))
    }
}

impl EntryView<'_> {
    /// About how many bytes of JSON the view renders to, so that a page of
    /// them can be written into a buffer of the right size at once.
    pub fn json_len_hint(&self) -> usize {
        // The field names, punctuation, three timestamps, a lease and two
        // numbers of up to 20 digits.
        const FIXED: usize = 256;
        FIXED
            + self.key.len()
            + self.value.map_or(0, str::len)
            + self.value_base64.as_ref().map_or(0, String::len)
    }
}

/// A value as the API carries it: `value` when its bytes are UTF-8, else
/// `value_base64`.
fn text_or_base64(value: &[u8]) -> (Option<&str>, Option<String>) {
    match std::str::from_utf8(value) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(STANDARD.encode(value))),
    }
}

/// One revision of a watch: `{"revision", "events"}`.
#[derive(Serialize)]
pub(crate) struct ChangeView<'a> {
    revision: u64,
    events: Vec<EventView<'a>>,
}

impl<'a> ChangeView<'a> {
    pub(crate) fn new(change: &'a Change) -> Self {
        ChangeView {
            revision: change.revision,
            events: change.events.iter().map(EventView::new).collect(),
        }
    }
}

/// An event as the API shows it: a put is the entry as GET shows it without
/// `revision` (the change's), a delete the version it removed and why.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum EventView<'a> {
    Put {
        key: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        value_base64: Option<String>,
        version: u64,
        created_at: Timestamp,
        updated_at: Timestamp,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<Timestamp>,
        #[serde(skip_serializing_if = "Option::is_none")]
        lease: Option<LeaseText>,
    },
    Delete {
        key: Cow<'a, str>,
        version: u64,
        reason: &'static str,
    },
}

impl<'a> EventView<'a> {
    fn new(event: &'a Event) -> Self {
        match event {
            Event::Put {
                key,
                value,
                version,
                created_at_us,
                updated_at_us,
                expires_at_us,
                lease,
            } => {
                let (value, value_base64) = text_or_base64(value);
                EventView::Put {
                    key: String::from_utf8_lossy(key),
                    value,
                    value_base64,
                    version: *version,
                    created_at: Timestamp(*created_at_us),
                    updated_at: Timestamp(*updated_at_us),
                    expires_at: expires_at_us.map(Timestamp),
                    lease: lease.map(LeaseText),
                }
            }
            Event::Delete {
                key,
                version,
                reason,
            } => EventView::Delete {
                key: String::from_utf8_lossy(key),
                version: *version,
                reason: reason.name(),
            },
        }
    }
}

/// Microseconds since the Unix epoch, rendered in RFC 3339 in UTC with six
/// fractional digits: `2026-11-26T04:03:50.188095Z`. A time chrono cannot
/// represent renders as the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timestamp(pub(crate) i64);

/// The length of a timestamp of a four-digit year.
const TIMESTAMP_LEN: usize = "2026-11-26T04:03:50.188095Z".len();

impl Timestamp {
    /// The text of a timestamp whose year has four digits, written into
    /// `out`; `None` for other years, which only chrono's formatter spells.
    fn write_common<'b>(&self, out: &'b mut [u8; TIMESTAMP_LEN]) -> Option<&'b str> {
        // Once, not per field: every field read of a `DateTime<Utc>` converts
        // it to local (UTC) time again.
        let time = DateTime::from_timestamp_micros(self.0)
            .unwrap_or_default()
            .naive_utc();
        let year = u32::try_from(time.year()).ok().filter(|y| *y <= 9999)?;
        *out = *b"0000-00-00T00:00:00.000000Z";
        put_pair(&mut out[0..2], year / 100);
        put_pair(&mut out[2..4], year % 100);
        put_pair(&mut out[5..7], time.month());
        put_pair(&mut out[8..10], time.day());
        put_pair(&mut out[11..13], time.hour());
        put_pair(&mut out[14..16], time.minute());
        put_pair(&mut out[17..19], time.second());
        let micros = time.nanosecond() / 1000;
        put_pair(&mut out[20..22], micros / 10_000);
        put_pair(&mut out[22..24], micros / 100 % 100);
        put_pair(&mut out[24..26], micros % 100);
        std::str::from_utf8(out).ok()
    }
}

/// Writes `n`, below 100, as two digits.
fn put_pair(out: &mut [u8], n: u32) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let at = (n as usize % 100) * 2;
    out.copy_from_slice(&PAIRS[at..at + 2]);
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; TIMESTAMP_LEN];
        match self.write_common(&mut buf) {
            Some(text) => f.write_str(text),
            None => f.write_str(
                &DateTime::from_timestamp_micros(self.0)
                    .unwrap_or_default()
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; TIMESTAMP_LEN];
        match self.write_common(&mut buf) {
            Some(text) => serializer.serialize_str(text),
            None => serializer.serialize_str(
                &DateTime::from_timestamp_micros(self.0)
                    .unwrap_or_default()
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::api::types::EntryBody;

    /// chrono's own rendering, which the fast path must match.
    fn chrono_text(micros: i64) -> String {
        DateTime::from_timestamp_micros(micros)
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    fn rendered(micros: i64) -> String {
        serde_json::to_value(Timestamp(micros))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    #[test]
    fn timestamps_render_as_chrono_does_at_the_edges() {
        for micros in [
            0,
            -1,
            1,
            1_764_097_672_123_456,
            // 9999-12-31T23:59:59.999999Z and the first instant after it.
            253_402_300_799_999_999,
            253_402_300_800_000_000,
            // Before year 0, and beyond what chrono represents.
            -62_167_219_200_000_001,
            i64::MIN,
            i64::MAX,
        ] {
            assert_eq!(rendered(micros), chrono_text(micros), "{micros} µs");
        }
        assert_eq!(
            rendered(1_764_097_672_000_001),
            "2025-11-25T19:07:52.000001Z"
        );
    }

    #[test]
    fn the_length_hint_covers_an_entry_with_nothing_to_escape() {
        let entry = Entry {
            key: b"users/42".to_vec(),
            value: vec![b'x'; 100],
            version: u64::MAX,
            revision: u64::MAX,
            created_at_us: 1_764_097_672_123_456,
            updated_at_us: 1_764_097_672_123_456,
            expires_at_us: Some(1_764_097_672_123_456),
            lease: Some(u64::MAX),
        };
        for keys_only in [false, true] {
            let view = EntryView::new(&entry, keys_only);
            let len = serde_json::to_vec(&view)
                .map(|json| json.len())
                .unwrap_or(usize::MAX);
            assert!(
                len <= view.json_len_hint(),
                "{len} > {}",
                view.json_len_hint()
            );
            assert!(
                len + 32 > view.json_len_hint(),
                "a hint of {} for {len}",
                view.json_len_hint()
            );
        }
    }

    proptest! {
        #[test]
        fn timestamps_render_as_chrono_does(micros in any::<i64>()) {
            prop_assert_eq!(rendered(micros), chrono_text(micros));
        }

        #[test]
        fn recent_timestamps_render_as_chrono_does(
            micros in 0i64..4_102_444_800_000_000,
        ) {
            prop_assert_eq!(rendered(micros), chrono_text(micros));
        }

        /// A view renders to JSON that reads back as the entry it shows.
        #[test]
        fn views_read_back_as_their_entry(
            key in "\\PC{0,12}",
            value in prop_oneof![
                any::<String>().prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..40),
            ],
            version in any::<u64>(),
            revision in any::<u64>(),
            created_at_us in any::<i64>(),
            updated_at_us in any::<i64>(),
            keys_only in any::<bool>(),
        ) {
            let entry = Entry {
                key: key.clone().into_bytes(),
                value: value.clone(),
                version,
                revision,
                created_at_us,
                updated_at_us,
                expires_at_us: None,
                lease: None,
            };
            let json = serde_json::to_vec(&EntryView::new(&entry, keys_only))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let body: EntryBody = serde_json::from_slice(&json)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (text, base64) = match (keys_only, String::from_utf8(value.clone())) {
                (true, _) => (None, None),
                (false, Ok(text)) => (Some(text), None),
                (false, Err(_)) => (None, Some(STANDARD.encode(&value))),
            };
            prop_assert_eq!(body, EntryBody {
                key,
                value: text,
                value_base64: base64,
                version,
                revision,
                created_at: chrono_text(created_at_us),
                updated_at: chrono_text(updated_at_us),
                expires_at: None,
                lease: None,
            });
        }
    }
}
