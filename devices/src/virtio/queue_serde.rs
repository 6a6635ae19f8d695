//! Serde for virtio-queue's `QueueState`, which has no serde support of its own: a remote
//! derive over its public fields, and `with` modules for the shapes the device states use.
//! A deserialized queue is untrusted until `Queue::try_from` accepts it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use virtio_queue::QueueState;

#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

#[derive(Serialize, Deserialize)]
struct Wrapped(#[serde(with = "QueueStateDef")] QueueState);

/// `#[serde(with = "queue_serde::option")]` for `Option<QueueState>`.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(queue: &Option<QueueState>, s: S) -> Result<S::Ok, S::Error> {
        queue.map(Wrapped).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<QueueState>, D::Error> {
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

/// `#[serde(with = "queue_serde::vec")]` for `Vec<QueueState>`.
pub mod vec {
    use super::*;

    pub fn serialize<S: Serializer>(queues: &[QueueState], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(queues.iter().map(|&q| Wrapped(q)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<QueueState>, D::Error> {
        Ok(Vec::<Wrapped>::deserialize(d)?.into_iter().map(|w| w.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Holder {
        #[serde(with = "option")]
        one: Option<QueueState>,
        #[serde(with = "vec")]
        many: Vec<QueueState>,
    }

    #[test]
    fn queue_states_round_trip_through_json() {
        let q = QueueState {
            max_size: 256,
            next_avail: 7,
            next_used: 5,
            event_idx_enabled: true,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let holder = Holder { one: Some(q), many: vec![q, QueueState::default()] };
        let json = serde_json::to_string(&holder).unwrap();
        assert!(json.contains("\"next_avail\":7"), "{json}");
        assert_eq!(serde_json::from_str::<Holder>(&json).unwrap(), holder);
        assert!(
            serde_json::from_str::<Holder>(r#"{"one":{"max_size":1},"many":[]}"#).is_err(),
            "missing fields refused"
        );
    }
}
