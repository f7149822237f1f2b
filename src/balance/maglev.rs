//! Maglev consistent hashing: the same key goes to the same server, on every Gatehouse node,
//! and a change of the server list moves as few keys as it can.
//!
//! The job is stickiness without shared state: caches behind the proxy stay warm, and a session
//! lands where it started, whichever node of the fleet the client reaches. Maglev (Eisenbud et
//! al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016, section 3.4)
//! does it with a lookup table of prime size `M`: every server derives a permutation of the
//! slots from two hashes of its identity (an offset and a skip), and the servers take turns
//! claiming their next free preferred slot until the table is full. A pick is then one hash and
//! one table read. Compared with a hash ring it balances far better for the same memory (each
//! server gets within a slot or so of `M / n` entries) and, as the paper measures, moves only
//! a little more than the minimal share of keys when a server comes or goes, because each
//! server's preferences do not depend on the others.
//!
//! Weights follow the weighted variant Envoy uses: the heaviest server takes a turn in every
//! round, a server of a third of that weight in every third round, so table shares are
//! proportional to weight and the turns stay interleaved.
//!
//! The table is built from configured identities and weights only, with `stable_hash` and no
//! random seed, so every process builds the same table. Eligibility changes from moment to
//! moment and must not rebuild anything: when a key's server is not eligible we probe a few
//! more slots, chosen by rehashing the key, and take the first eligible server there; if all
//! of those miss (most servers down) weighted rendezvous hashing over the eligible servers
//! decides. Both are fixed per key, so a key's servers form one preference list: keys whose
//! server is eligible never move, and keys of an ineligible server spread over the others in
//! proportion to their weights and come back when it does.

use std::fmt;

use super::{stable_hash, Candidates};

/// The table size: prime (the permutation needs skips coprime with it) and, as the paper
/// advises, much larger than the number of servers, so that shares are even. 256 KiB.
const TABLE_SIZE: usize = 65_537;

/// Slots probed for an eligible server before the rendezvous scan. With a quarter of the
/// servers eligible, 16 probes all miss once in a hundred picks.
const PROBES: u64 = 16;

/// Table slot of a server not placed yet, during the build.
const EMPTY: u32 = u32::MAX;

pub struct Maglev {
    /// Slot to server index; empty when no server has a positive weight.
    table: Box<[u32]>,
    /// Each server's identity hash, for the rendezvous fallback.
    ids: Box<[u64]>,
    /// Configured weights, for the rendezvous fallback: configured rather than current, so the
    /// fallback does not move keys while a server ramps up.
    weights: Box<[u32]>,
}

impl fmt::Debug for Maglev {
    // The derived one would print 65,537 numbers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("servers", &self.ids.len())
            .field("table_size", &self.table.len())
            .finish()
    }
}

impl Maglev {
    /// `servers[i]` is server `i`'s stable identity (its address as text) and weight.
    pub fn new(servers: &[(&str, u32)]) -> Maglev {
        Maglev::with_table_size(servers, TABLE_SIZE)
    }

    /// `m` must be prime; tests use small tables to see the whole of them.
    fn with_table_size(servers: &[(&str, u32)], m: usize) -> Maglev {
        Maglev {
            table: populate(servers, m),
            ids: servers.iter().map(|&(id, _)| identity_hash(id)).collect(),
            weights: servers.iter().map(|&(_, w)| w).collect(),
        }
    }

    /// The server for the key hashed to `hash`, or the next eligible one in that key's fixed
    /// order of preference; `None` when no server is eligible. Indices at or beyond
    /// `c.len()` are treated as ineligible, as are servers `c` has beyond the ones the table
    /// was built with.
    pub fn pick(&self, c: &dyn Candidates, hash: u64) -> Option<usize> {
        let m = self.table.len() as u64;
        if m > 0 {
            let mut h = hash;
            for probe in 1..=PROBES {
                let i = self.table[(h % m) as usize] as usize;
                if i < c.len() && c.eligible(i) {
                    return Some(i);
                }
                h = mix(hash ^ probe.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
        }
        self.rendezvous(c, hash)
    }

    /// Weighted rendezvous (highest random weight) hashing: each eligible server scores
    /// `weight / -ln(u)` with `u` uniform in (0, 1) from hashing the key with the server's
    /// identity, and the highest score wins, which makes each server's chance proportional to
    /// its weight and keeps the winner unchanged when some other server comes or goes.
    fn rendezvous(&self, c: &dyn Candidates, hash: u64) -> Option<usize> {
        let n = c.len().min(self.ids.len());
        let mut best: Option<(usize, f64)> = None;
        for i in (0..n).filter(|&i| c.eligible(i)) {
            let bits = mix(hash ^ self.ids[i]) >> 11;
            // 53 random bits, offset by half a step so that `u` is never 0 or 1.
            let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
            let score = f64::from(self.weights[i]) / -u.ln();
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// The paper's population (its Pseudocode 1), with Envoy's weighted turns. Each server walks
/// its permutation `offset, offset + skip, offset + 2 skip, ... (mod m)`, which visits every
/// slot once because `m` is prime and `0 < skip < m`, so a server always finds a free slot
/// while the table is not full.
fn populate(servers: &[(&str, u32)], m: usize) -> Box<[u32]> {
    struct Turns {
        /// The next slot of this server's permutation to try.
        slot: usize,
        skip: usize,
        weight: u64,
        /// The server takes its next turn in the first round `r` with `r * weight >= due`.
        due: u64,
    }
    let max_weight = servers
        .iter()
        .map(|&(_, w)| u64::from(w))
        .max()
        .unwrap_or(0);
    if max_weight == 0 || m < 2 {
        return Box::default();
    }
    let mut turns: Vec<Turns> = servers
        .iter()
        .map(|&(id, w)| Turns {
            slot: (salted_hash(b"maglev offset\0", id) % m as u64) as usize,
            skip: (salted_hash(b"maglev skip\0", id) % (m as u64 - 1)) as usize + 1,
            weight: u64::from(w),
            // Not 0: then every server would take a turn in round 1 and the light ones one turn
            // more than their share.
            due: max_weight,
        })
        .collect();
    let mut table = vec![EMPTY; m];
    let mut filled = 0;
    // Every round the heaviest server takes a turn, so this ends after at most `m` rounds.
    let mut round: u64 = 0;
    while filled < m {
        round += 1;
        for (i, t) in turns.iter_mut().enumerate() {
            if t.weight == 0 || round * t.weight < t.due {
                continue;
            }
            t.due += max_weight;
            while table[t.slot] != EMPTY {
                t.slot = (t.slot + t.skip) % m;
            }
            // The config bounds server counts far below u32::MAX.
            table[t.slot] = i as u32;
            t.slot = (t.slot + t.skip) % m;
            filled += 1;
            if filled == m {
                break;
            }
        }
    }
    table.into_boxed_slice()
}

/// The key under which a server's identity is hashed for rendezvous.
fn identity_hash(id: &str) -> u64 {
    salted_hash(b"maglev id\0", id)
}

/// `stable_hash` of `salt` followed by `id`: different salts give the paper's independent hash
/// functions from one stable hash. The NUL ends the salt so no identity can imitate another salt.
fn salted_hash(salt: &[u8], id: &str) -> u64 {
    let mut bytes = Vec::with_capacity(salt.len() + id.len());
    bytes.extend_from_slice(salt);
    bytes.extend_from_slice(id.as_bytes());
    stable_hash(&bytes)
}

/// The SplitMix64 finaliser: spreads a key hash into a fresh, independent-looking probe.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::super::random::testing::{assert_near, Servers};
    use super::*;

    const KEYS: u64 = 100_000;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 200, i % 200 + 1))
            .collect()
    }

    fn build(names: &[String], weights: &[u32]) -> Maglev {
        let servers: Vec<(&str, u32)> = names
            .iter()
            .zip(weights)
            .map(|(n, &w)| (n.as_str(), w))
            .collect();
        Maglev::new(&servers)
    }

    fn key(k: u64) -> u64 {
        stable_hash(format!("session-{k}").as_bytes())
    }

    /// The server name each key goes to.
    fn assignment<'a>(m: &Maglev, c: &Servers, names: &'a [String]) -> Vec<&'a str> {
        (0..KEYS)
            .map(|k| names[m.pick(c, key(k)).unwrap()].as_str())
            .collect()
    }

    fn table_shares(m: &Maglev, n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for &i in m.table.iter() {
            counts[i as usize] += 1;
        }
        counts
            .iter()
            .map(|&k| k as f64 / m.table.len() as f64)
            .collect()
    }

    fn key_shares(m: &Maglev, c: &Servers) -> Vec<f64> {
        let mut counts = vec![0usize; c.len()];
        for k in 0..KEYS {
            counts[m.pick(c, key(k)).unwrap()] += 1;
        }
        counts.iter().map(|&k| k as f64 / KEYS as f64).collect()
    }

    fn moved(before: &[&str], after: &[&str]) -> f64 {
        let moved = before.iter().zip(after).filter(|(a, b)| a != b).count();
        moved as f64 / before.len() as f64
    }

    #[test]
    fn the_table_size_is_prime() {
        assert!((2..=256).all(|d| !TABLE_SIZE.is_multiple_of(d)));
    }

    #[test]
    fn five_equal_servers_share_table_and_keys_evenly() {
        let names = names(5);
        let m = build(&names, &[1; 5]);
        assert_eq!(m.table.len(), TABLE_SIZE);
        let table = table_shares(&m, 5);
        let keys = key_shares(&m, &Servers::equal(5));
        println!("5 equal servers: table {table:?}, keys {keys:?}");
        for i in 0..5 {
            assert_near(table[i], 0.2, 0.005, "table share");
            assert_near(keys[i], 0.2, 0.03, "key share");
        }
    }

    #[test]
    fn weights_1_to_2_give_a_third_and_two_thirds() {
        let names = names(2);
        let m = build(&names, &[1, 2]);
        let table = table_shares(&m, 2);
        let keys = key_shares(&m, &Servers::weighted(&[1.0, 2.0]));
        println!("weights 1:2: table {table:?}, keys {keys:?}");
        assert_near(table[0], 1.0 / 3.0, 0.005, "table share");
        assert_near(keys[0], 1.0 / 3.0, 0.03, "key share");
    }

    #[test]
    fn mixed_weights_are_proportional() {
        let names = names(4);
        let weights = [1, 3, 5, 7];
        let table = table_shares(&build(&names, &weights), 4);
        println!("weights 1:3:5:7: table {table:?}");
        for (share, w) in table.iter().zip(weights) {
            assert_near(*share, f64::from(w) / 16.0, 0.005, "table share");
        }
    }

    #[test]
    fn removing_a_server_moves_little_more_than_its_keys() {
        let n = 5;
        let all = names(n);
        let before = build(&all, &[1; 5]);
        let before_keys = assignment(&before, &Servers::equal(n), &all);
        let removed = &all[2];
        let rest: Vec<String> = all.iter().filter(|s| *s != removed).cloned().collect();
        let after = build(&rest, &[1; 4]);
        let after_keys = assignment(&after, &Servers::equal(n - 1), &rest);

        let total = moved(&before_keys, &after_keys);
        let stayers: Vec<usize> = (0..KEYS as usize)
            .filter(|&k| before_keys[k] != removed)
            .collect();
        let disrupted = stayers
            .iter()
            .filter(|&&k| before_keys[k] != after_keys[k])
            .count() as f64
            / stayers.len() as f64;
        println!(
            "remove 1 of {n}: {total:.4} of keys moved, {disrupted:.4} of the other servers' keys"
        );
        assert!(total <= 1.0 / n as f64 + 0.05, "{total}");
        assert!(disrupted <= 0.05, "{disrupted}");
        assert!(after_keys.iter().all(|s| s != removed));
    }

    #[test]
    fn adding_a_server_moves_about_its_share() {
        let n = 5;
        let all = names(n + 1);
        let before = build(&all[..n], &[1; 5]);
        let before_keys = assignment(&before, &Servers::equal(n), &all[..n]);
        let after = build(&all, &[1; 6]);
        let after_keys = assignment(&after, &Servers::equal(n + 1), &all);
        let total = moved(&before_keys, &after_keys);
        let to_new = after_keys.iter().filter(|s| **s == all[n]).count() as f64 / KEYS as f64;
        println!(
            "add a {}th server: {total:.4} of keys moved, {to_new:.4} to it",
            n + 1
        );
        let ideal = 1.0 / (n + 1) as f64;
        assert!(total >= ideal - 0.03 && total <= ideal + 0.05, "{total}");
        assert_near(to_new, ideal, 0.03, "new server's share");
    }

    #[test]
    fn an_ineligible_servers_keys_go_elsewhere_and_others_stay() {
        let names = names(5);
        let m = build(&names, &[1; 5]);
        let up = assignment(&m, &Servers::equal(5), &names);
        let down = assignment(&m, &Servers::equal(5).without(3), &names);
        let mut spread = [0usize; 5];
        for k in 0..KEYS as usize {
            if up[k] == names[3] {
                assert_ne!(down[k], names[3]);
                spread[names.iter().position(|s| *s == down[k]).unwrap()] += 1;
            } else {
                assert_eq!(up[k], down[k], "key {k} moved");
            }
        }
        let orphans: usize = spread.iter().sum();
        println!("server 3 down: its {orphans} keys went {spread:?}");
        for i in [0, 1, 2, 4] {
            assert_near(
                spread[i] as f64 / orphans as f64,
                0.25,
                0.05,
                "share of orphans",
            );
        }
        // It comes back: its keys return.
        assert_eq!(assignment(&m, &Servers::equal(5), &names), up);
    }

    #[test]
    fn when_most_servers_are_down_keys_spread_and_stay_put() {
        let names = names(20);
        let m = build(&names, &[1; 20]);
        let mut c = Servers::equal(20);
        c.eligible = (0..20).map(|i| i == 4 || i == 9).collect();
        let first = assignment(&m, &c, &names);
        let to_4 = first.iter().filter(|s| **s == names[4]).count() as f64 / KEYS as f64;
        assert_near(to_4, 0.5, 0.03, "share of server 4");
        assert_eq!(assignment(&m, &c, &names), first);
        // A third server coming back takes keys from both, but 4 and 9 do not swap keys.
        c.eligible[13] = true;
        let third = assignment(&m, &c, &names);
        for k in 0..KEYS as usize {
            assert!(third[k] == first[k] || third[k] == names[13]);
        }
    }

    #[test]
    fn tables_are_deterministic() {
        let names = names(7);
        let weights = [1, 2, 3, 1, 1, 5, 2];
        assert_eq!(build(&names, &weights).table, build(&names, &weights).table);
        // Pinned: a different table here means nodes of different versions disagree on where
        // keys go. Change it only on purpose.
        let small = Maglev::with_table_size(&[("a:1", 1), ("b:1", 1), ("c:1", 2)], 13);
        assert_eq!(
            &*small.table,
            &[2, 2, 2, 1, 1, 2, 2, 0, 0, 2, 2, 0, 1],
            "small table"
        );
        let full = build(&names, &weights);
        let digest = stable_hash(
            &full
                .table
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        assert_eq!(digest, 822_072_426_967_638_930, "full table");
    }

    #[test]
    fn no_servers_or_none_eligible_is_none() {
        let m = Maglev::new(&[]);
        assert_eq!(m.pick(&Servers::equal(0), 42), None);
        let names = names(3);
        let m = build(&names, &[1; 3]);
        let none = Servers::equal(3).without(0).without(1).without(2);
        assert_eq!(m.pick(&none, 42), None);
        // Zero weights (refused by the config) leave no table, but still an answer.
        let zero = Maglev::new(&[("a:1", 0), ("b:1", 0)]);
        assert!(zero.pick(&Servers::equal(2), 42).is_some());
    }
}
