//! Fuzzing (bounded proptest runs, part of CI): every request the admin and Raft services
//! decode, from arbitrary bytes and from mutations of valid ones, goes through the same
//! decoding the services do (protobuf, then the JSON payloads inside), and the certificate
//! reader gets arbitrary input. None may panic.

use openraft::{SnapshotMeta, StoredMembership, Vote};
use pgw_core::failover::Observation;
use pgw_server::raft::types::TypeConfig;
use proptest::prelude::*;
use prost::Message;

/// Decodes `bytes` as each request type, then its embedded payloads, as the services do.
fn decode_all(bytes: &[u8]) {
    if let Ok(r) = pgw_proto::RaftRequest::decode(bytes) {
        let _ =
            serde_json::from_slice::<openraft::raft::AppendEntriesRequest<TypeConfig>>(&r.payload);
        let _ = serde_json::from_slice::<openraft::raft::VoteRequest<u64>>(&r.payload);
        let _ = serde_json::from_slice::<openraft::raft::InstallSnapshotRequest<TypeConfig>>(
            &r.payload,
        );
    }
    if let Ok(r) = pgw_proto::ReportRequest::decode(bytes) {
        let _ = serde_json::from_slice::<Observation>(&r.observation);
    }
    let _ = pgw_proto::PcpRequest::decode(bytes);
    let _ = pgw_proto::HelloRequest::decode(bytes);
    let _ = pgw_proto::StatusRequest::decode(bytes);
    let _ = pgw_proto::SetPausedRequest::decode(bytes);
    let _ = pgw_proto::HistoryRequest::decode(bytes);
    let _ = pgw_proto::SwitchoverRequest::decode(bytes);
    let _ = pgw_proto::FailoverRequest::decode(bytes);
    let _ = pgw_proto::RecoverRequest::decode(bytes);
    let _ = pgw_proto::OperationRequest::decode(bytes);
    let _ = pgw_server::x509::parse(bytes);
}

fn valid_messages() -> Vec<Vec<u8>> {
    let snap = openraft::raft::InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: "s".into(),
        },
        offset: 0,
        data: vec![1, 2, 3],
        done: true,
    };
    let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let obs = serde_json::json!({
        "member": "a", "cluster": "global", "role": "primary", "timeline": 1,
        "flush_lsn": 5, "replay_lsn": 0, "streaming": false, "epoch_seen": 1,
        "crashed": false, "standbys": {"b": "sync"}
    });
    let id = Some(pgw_proto::Identity {
        cluster_id: "c".into(),
        fingerprint: "f".into(),
        from: 1,
        from_name: "a".into(),
        generation: 0,
    });
    vec![
        pgw_proto::RaftRequest {
            identity: id.clone(),
            payload: serde_json::to_vec(&snap).unwrap_or_default(),
        }
        .encode_to_vec(),
        pgw_proto::RaftRequest {
            identity: id.clone(),
            payload: serde_json::to_vec(&append).unwrap_or_default(),
        }
        .encode_to_vec(),
        pgw_proto::ReportRequest {
            identity: id,
            observation: serde_json::to_vec(&obs).unwrap_or_default(),
            cert: vec![0x30, 0x03, 0x02, 0x01, 0x01],
            scheme: 0x0403,
            signature: vec![1, 2, 3],
        }
        .encode_to_vec(),
        pgw_proto::FailoverRequest {
            cluster: "global".into(),
            target: "b".into(),
            accept_data_loss: true,
        }
        .encode_to_vec(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_requests_never_panic(which in 0usize..4, at in any::<usize>(), flips in proptest::collection::vec(any::<u8>(), 1..6)) {
        let mut m = valid_messages().swap_remove(which);
        if !m.is_empty() {
            for (k, f) in flips.iter().enumerate() {
                let i = (at.wrapping_add(k * 7)) % m.len();
                m[i] ^= f;
            }
        }
        decode_all(&m);
    }

    /// JSON payloads with a field replaced by an arbitrary value (huge offsets, negative
    /// numbers, wrong types).
    #[test]
    fn mutated_json_payloads_never_panic(pos in any::<usize>(), with in any::<String>()) {
        for m in valid_messages() {
            if let Ok(r) = pgw_proto::RaftRequest::decode(m.as_slice()) {
                let mut text = String::from_utf8_lossy(&r.payload).to_string();
                let at = pos % (text.len() + 1);
                if text.is_char_boundary(at) {
                    text.insert_str(at, &with);
                }
                let _ = serde_json::from_str::<openraft::raft::InstallSnapshotRequest<TypeConfig>>(&text);
                let _ = serde_json::from_str::<openraft::raft::AppendEntriesRequest<TypeConfig>>(&text);
            }
        }
    }
}
