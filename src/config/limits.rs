//! The transaction size rules of design.md rule 7: a registration must fit
//! in one etcd transaction (128 operations, 1.5 MiB by default), checked at
//! load time for the longest host name the layout allows.

use super::Config;
use crate::layout;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const MAX_TXN_BYTES: usize = 1536 * 1024;
/// Keys a registration may grow into per role beyond services, meta and
/// checks: ip, health, owner, maintenance.
const FIXED_KEYS_PER_ROLE: usize = 4;
/// Overhead per operation in a txn request (protobuf framing, lease id).
const PER_OP_OVERHEAD: usize = 32;

impl Config {
    /// Checks that a registration of this config fits in one etcd
    /// transaction (design.md rule 7), counting the longest host name.
    pub(super) fn check_txn_limits(&self) -> Result<(), String> {
        let roles = self.roles.len().max(1);
        let per_role =
            FIXED_KEYS_PER_ROLE + self.services.len() + self.meta.len() + self.checks.len();
        let ops = roles * per_role;
        if ops > MAX_TXN_OPS {
            return Err(format!(
                "a registration would need {ops} keys ({roles} roles x {per_role} keys each) but etcd \
                 allows {MAX_TXN_OPS} operations per transaction; use fewer roles, services, meta keys or checks"
            ));
        }
        let dir_len = self.prefix.len() + 3 * (layout::MAX_SEGMENT_LEN + 1);
        let leaf_bytes: usize = self
            .services
            .keys()
            .map(|k| dir_len + 9 + k.len() + 5 + PER_OP_OVERHEAD)
            .chain(
                self.meta
                    .iter()
                    .map(|(k, v)| dir_len + 5 + k.len() + v.len() + PER_OP_OVERHEAD),
            )
            .chain(self.checks.iter().map(|c| {
                // {"status":..,"output":<4 KiB, JSON-escaped up to 6x>,"since":..}
                dir_len + 7 + c.name.len() + 6 * crate::check::MAX_OUTPUT + 96 + PER_OP_OVERHEAD
            }))
            .sum::<usize>()
            + FIXED_KEYS_PER_ROLE * (dir_len + 16 + 256 + PER_OP_OVERHEAD);
        let bytes = roles * leaf_bytes * 2;
        if bytes > MAX_TXN_BYTES {
            return Err(format!(
                "a registration would be about {bytes} bytes but etcd accepts {MAX_TXN_BYTES} per \
                 transaction; shorten the meta values or use fewer checks or roles"
            ));
        }
        Ok(())
    }
}
