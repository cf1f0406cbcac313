//! Bill layouts: how a bill splits its period into the cells (band and price level) whose totals
//! it releases. A meter's bill releases its cells; an aggregate over its cohort, less the bills
//! of the other members, releases the other members' cells for it. The ledger keeps each bill's
//! layout so that the cells two layouts cut each other into (their *atoms*) can be held to the
//! band-width rule whenever a bill and an aggregate meet.

use std::collections::BTreeMap;

use chrono_tz::Tz;
use psm_core::linear::mask::SlotRun;

/// The cell of slots a bill does not price (released by neither bill).
pub const REST: u16 = u16::MAX;

/// Most runs a stored layout may have (a year of 5-minute slots alternating cells is far less
/// than a layout of a bill's period can hold: periods are months).
const MAX_RUNS: usize = 1 << 20;

/// One bill's cells over its period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The zone the bill's tariff counts local days in.
    pub tz: Tz,
    /// Slots [start, end).
    pub start: u64,
    pub end: u64,
    /// (slots, cell) covering the period in order; cells are numbered by first appearance, so
    /// equal partitions have equal layouts, and [`REST`] marks unpriced slots.
    pub runs: Vec<(u32, u16)>,
}

impl Layout {
    /// The layout of a bill over [start, end) from every band's runs (the runs a keyshare places
    /// for the band-width rule): a cell per band and weight, since at dynamic prices each price
    /// level of a band is a total of its own.
    pub fn of_bill(tz: Tz, start: u64, end: u64, bands: &[Vec<SlotRun>]) -> Layout {
        let mut cell = vec![(usize::MAX, 0i64); (end.saturating_sub(start)) as usize];
        for (band, runs) in bands.iter().enumerate() {
            for r in runs {
                for s in r.start.max(start)..r.end.min(end) {
                    cell[(s - start) as usize] = (band, r.weight);
                }
            }
        }
        let mut ids: BTreeMap<(usize, i64), u16> = BTreeMap::new();
        let mut runs: Vec<(u32, u16)> = Vec::new();
        for c in cell {
            let id = if c.0 == usize::MAX {
                REST
            } else {
                let next = ids.len() as u16;
                *ids.entry(c).or_insert(next)
            };
            match runs.last_mut() {
                Some((n, last)) if *last == id => *n += 1,
                _ => runs.push((1, id)),
            }
        }
        Layout {
            tz,
            start,
            end,
            runs,
        }
    }

    /// tz name length (1) ‖ tz ‖ start (8) ‖ end (8) ‖ runs of (slots (4) ‖ cell (2)).
    pub fn encode(&self) -> Vec<u8> {
        let tz = self.tz.name().as_bytes();
        let mut out = Vec::with_capacity(17 + tz.len() + 6 * self.runs.len());
        out.push(tz.len() as u8);
        out.extend_from_slice(tz);
        out.extend_from_slice(&self.start.to_be_bytes());
        out.extend_from_slice(&self.end.to_be_bytes());
        for (n, c) in &self.runs {
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&c.to_be_bytes());
        }
        out
    }

    /// The layout [`Self::encode`] wrote; `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<Layout> {
        let n = usize::from(*b.first()?);
        let tz: Tz = std::str::from_utf8(b.get(1..1 + n)?).ok()?.parse().ok()?;
        let rest = b.get(1 + n..)?;
        if rest.len() < 16 || (rest.len() - 16) % 6 != 0 || (rest.len() - 16) / 6 > MAX_RUNS {
            return None;
        }
        let start = u64::from_be_bytes(rest[0..8].try_into().ok()?);
        let end = u64::from_be_bytes(rest[8..16].try_into().ok()?);
        let runs: Vec<(u32, u16)> = rest[16..]
            .chunks_exact(6)
            .map(|c| {
                (
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                    u16::from_be_bytes([c[4], c[5]]),
                )
            })
            .collect();
        let covered: u64 = runs.iter().map(|(n, _)| u64::from(*n)).sum();
        (end >= start && covered == end - start).then_some(Layout {
            tz,
            start,
            end,
            runs,
        })
    }

    /// What the ledger stores and compares layouts by.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"psm/v2/bill-layout");
        h.update(&self.encode());
        *h.finalize().as_bytes()
    }

    /// Each priced cell's slots, as merged ranges (the totals this bill releases).
    pub fn cells(&self) -> BTreeMap<u16, Vec<(u64, u64)>> {
        let mut out: BTreeMap<u16, Vec<(u64, u64)>> = BTreeMap::new();
        let mut at = self.start;
        for (n, c) in &self.runs {
            let end = at + u64::from(*n);
            if *c != REST {
                let runs = out.entry(*c).or_default();
                match runs.last_mut() {
                    Some((_, last)) if *last == at => *last = end,
                    _ => runs.push((at, end)),
                }
            }
            at = end;
        }
        out
    }

    /// The cells of the common refinement of two layouts of one period, each as slot runs, by
    /// (cell here, cell there), leaving out slots unpriced by both. Knowing both layouts' cell
    /// totals for one meter is knowing these atoms' totals (up to the unpriced rest).
    pub fn atoms(&self, other: &Layout) -> BTreeMap<(u16, u16), Vec<(u64, u64)>> {
        let mut out: BTreeMap<(u16, u16), Vec<(u64, u64)>> = BTreeMap::new();
        let (mut a, mut b) = (self.runs.iter().peekable(), other.runs.iter().peekable());
        let (mut left_a, mut left_b) = (0u64, 0u64);
        let (mut cell_a, mut cell_b) = (REST, REST);
        let mut at = self.start;
        loop {
            if left_a == 0 {
                match a.next() {
                    Some((n, c)) => (left_a, cell_a) = (u64::from(*n), *c),
                    None => break,
                }
                continue;
            }
            if left_b == 0 {
                match b.next() {
                    Some((n, c)) => (left_b, cell_b) = (u64::from(*n), *c),
                    None => break,
                }
                continue;
            }
            let step = left_a.min(left_b);
            if (cell_a, cell_b) != (REST, REST) {
                let runs = out.entry((cell_a, cell_b)).or_default();
                match runs.last_mut() {
                    Some((_, end)) if *end == at => *end = at + step,
                    _ => runs.push((at, at + step)),
                }
            }
            at += step;
            left_a -= step;
            left_b -= step;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, end: u64, weight: i64) -> SlotRun {
        SlotRun { start, end, weight }
    }

    #[test]
    fn layouts_number_cells_by_first_appearance_and_round_trip() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // Two bands given in either order, one with two price levels, a gap left unpriced.
        let a = Layout::of_bill(
            tz,
            100,
            112,
            &[
                vec![run(100, 104, 7)],
                vec![run(104, 106, 3), run(108, 112, 5)],
            ],
        );
        let b = Layout::of_bill(
            tz,
            100,
            112,
            &[
                vec![run(104, 106, 9), run(108, 112, 1)],
                vec![run(100, 104, 2)],
            ],
        );
        assert_eq!(a.runs, vec![(4, 0), (2, 1), (2, REST), (4, 2)]);
        assert_eq!(
            a, b,
            "the same partition whatever the prices and band order"
        );
        assert_eq!(a.hash(), b.hash());
        assert_eq!(Layout::decode(&a.encode()), Some(a.clone()));
        let mut bad = a.encode();
        bad.pop();
        assert_eq!(Layout::decode(&bad), None);
        let mut short = a.encode();
        short.truncate(short.len() - 6);
        assert_eq!(Layout::decode(&short), None, "runs must cover the period");
    }

    #[test]
    fn atoms_are_the_cells_two_layouts_cut_each_other_into() {
        let tz: Tz = "UTC".parse().unwrap();
        let p = Layout::of_bill(tz, 0, 10, &[vec![run(0, 6, 1)], vec![run(6, 10, 1)]]);
        let q = Layout::of_bill(tz, 0, 10, &[vec![run(0, 5, 1)], vec![run(5, 8, 1)]]);
        let atoms = p.atoms(&q);
        assert_eq!(atoms[&(0, 0)], vec![(0, 5)]);
        assert_eq!(
            atoms[&(0, 1)],
            vec![(5, 6)],
            "the one slot between the two edges"
        );
        assert_eq!(atoms[&(1, 1)], vec![(6, 8)]);
        assert_eq!(atoms[&(1, REST)], vec![(8, 10)]);
        assert_eq!(atoms.len(), 4);
        assert_eq!(p.atoms(&p).len(), 2, "a layout against itself is its cells");
        assert_eq!(
            q.cells(),
            BTreeMap::from([(0, vec![(0, 5)]), (1, vec![(5, 8)])]),
            "the unpriced rest is no cell"
        );
    }
}
