//! Which of a service's backends new flows avoid for the data path's suspect marks.
//!
//! The data path marks a backend suspect when it refuses or ignores a new connection, and steers
//! new flows off it to the next Maglev slots (a few at most: it must stay cheap). The daemon then
//! republishes the service's table without the suspect backends, so that every new flow finds
//! one that is not suspect whenever one exists. Marks cost evidence to forge, but not nothing: at
//! most half of the backends that take new flows are avoided at once, the longest-marked first.
//! Marks beyond that share are cleared where the data path would steer for them (a backend
//! without a mark is left): new flows then keep at least half of the backends. Where every
//! backend is marked, the marks stay: the data path has nowhere to steer, and a refusal from a
//! backend marked before the flow reaches the client at once (lb-ebpf's `flow.rs`).

use std::collections::BTreeSet;

/// One backend that takes new flows (healthy, weight > 0), with its live suspect mark if any.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub id: u32,
    /// When the data path marked it, if the mark is still live.
    pub marked_since: Option<u64>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Left out of the Maglev table.
    pub avoided: BTreeSet<u32>,
    /// Marked, over the share, and with an unmarked backend to steer to: their marks go.
    pub unmarked: BTreeSet<u32>,
}

/// At most this share of a service's eligible backends is avoided at once: a client able to
/// forge marks can move new flows around, never take most of the service's capacity away.
pub fn max_avoided(eligible: usize) -> usize {
    eligible / 2
}

pub fn decide(candidates: &[Candidate]) -> Decision {
    let mut marked: Vec<(u64, u32)> = candidates
        .iter()
        .filter_map(|c| c.marked_since.map(|since| (since, c.id)))
        .collect();
    marked.sort_unstable();
    let keep = max_avoided(candidates.len());
    let steers = marked.len() < candidates.len();
    Decision {
        avoided: marked.iter().take(keep).map(|&(_, id)| id).collect(),
        unmarked: if steers {
            marked.iter().skip(keep).map(|&(_, id)| id).collect()
        } else {
            BTreeSet::new()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(marks: &[Option<u64>]) -> Vec<Candidate> {
        marks
            .iter()
            .enumerate()
            .map(|(i, &marked_since)| Candidate {
                id: i as u32 + 1,
                marked_since,
            })
            .collect()
    }

    fn ids(list: &[u32]) -> BTreeSet<u32> {
        list.iter().copied().collect()
    }

    #[test]
    fn no_marks_avoid_nothing() {
        assert_eq!(
            decide(&candidates(&[None, None, None])),
            Decision::default()
        );
    }

    #[test]
    fn a_suspect_backend_is_avoided_while_others_remain() {
        let d = decide(&candidates(&[None, Some(5)]));
        assert_eq!(d.avoided, ids(&[2]));
        assert!(d.unmarked.is_empty());
    }

    #[test]
    fn a_lone_backend_is_never_avoided_and_keeps_its_mark() {
        // Nothing better exists: its flows go to it, and its refusals reach the client.
        assert_eq!(decide(&candidates(&[Some(5)])), Decision::default());
    }

    #[test]
    fn at_most_half_are_avoided_the_longest_marked_first() {
        let d = decide(&candidates(&[Some(30), Some(10), None, Some(20), Some(40)]));
        assert_eq!(d.avoided, ids(&[2, 4]));
        assert_eq!(d.unmarked, ids(&[1, 5]));
    }

    #[test]
    fn every_backend_marked_leaves_half_in_the_table_marks_kept() {
        for n in 1..=16usize {
            let marks: Vec<Option<u64>> = (0..n).map(|i| Some(i as u64)).collect();
            let d = decide(&candidates(&marks));
            assert_eq!(d.avoided.len(), n / 2, "{n} backends");
            assert!(d.unmarked.is_empty(), "{n} backends");
        }
    }

    #[test]
    fn new_flows_keep_at_least_half_of_the_backends_whatever_is_marked() {
        // Every combination of marks on up to 8 backends: the backends left to new flows are
        // those neither avoided nor still marked with an unmarked one to steer to.
        for n in 1..=8usize {
            for mask in 0u32..(1 << n) {
                let marks: Vec<Option<u64>> = (0..n)
                    .map(|i| (mask & (1 << i) != 0).then_some(100 - i as u64))
                    .collect();
                let d = decide(&candidates(&marks));
                let all_marked = mask.count_ones() as usize == n;
                let serving = (1..=n as u32)
                    .filter(|id| !d.avoided.contains(id))
                    .filter(|id| {
                        let marked = marks[*id as usize - 1].is_some() && !d.unmarked.contains(id);
                        all_marked || !marked
                    })
                    .count();
                assert!(
                    serving * 2 >= n,
                    "{n} backends, marks {mask:b}: {serving} serve"
                );
                assert!(serving >= 1);
            }
        }
    }
}
