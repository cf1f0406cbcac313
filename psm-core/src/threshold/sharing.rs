//! Replicated secret sharing over Z_2^128 (Shamir needs a field; 2^128 is not one).

use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::ThresholdError;

/// Largest number of parties: work grows with C(n, t−1) shares.
pub const MAX_PARTIES: usize = 7;

/// A t-of-n replicated sharing scheme. Shares are indexed by the canonical order of the
/// (t−1)-subsets U of {0..n−1}: increasing value of U's bitmask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    n: usize,
    t: usize,
}

impl Scheme {
    /// 2 ≤ t ≤ n ≤ 7 and 2t > n: any two quorums share a keyshare, so compute cannot split a
    /// pair of releases between two sets of keyshares that never see each other's ledger.
    pub fn new(n: usize, t: usize) -> Result<Self, ThresholdError> {
        if !(2..=MAX_PARTIES).contains(&n) || t < 2 || t > n || 2 * t <= n {
            return Err(ThresholdError::BadScheme(format!(
                "{t}-of-{n}: need 2 <= t <= n <= {MAX_PARTIES} and a majority quorum (2t > n)"
            )));
        }
        Ok(Scheme { n, t })
    }

    pub fn parties(&self) -> usize {
        self.n
    }

    pub fn threshold(&self) -> usize {
        self.t
    }

    /// The (t−1)-subsets as bitmasks, in canonical order; share i belongs to subset i.
    pub fn subsets(&self) -> Vec<u32> {
        (0u32..(1 << self.n))
            .filter(|m| m.count_ones() as usize == self.t - 1)
            .collect()
    }

    /// Number of shares, C(n, t−1).
    pub fn share_count(&self) -> usize {
        self.subsets().len()
    }

    /// Whether party `p` (0-based) holds share `index` (it does when p ∉ U).
    pub fn holds(&self, party: usize, index: usize) -> bool {
        self.subsets()
            .get(index)
            .is_some_and(|u| party < self.n && u & (1 << party) == 0)
    }

    /// Share indices held by party `p`.
    pub fn held_by(&self, party: usize) -> Vec<usize> {
        self.subsets()
            .iter()
            .enumerate()
            .filter(|(_, u)| party < self.n && *u & (1 << party) == 0)
            .map(|(i, _)| i)
            .collect()
    }
}

/// What one party holds of one secret key: its shares r_U, by canonical index.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct PartyShares {
    /// 0-based party index.
    #[zeroize(skip)]
    pub party: usize,
    /// (share index, r_U words).
    pub shares: Vec<(usize, Vec<u128>)>,
}

impl std::fmt::Debug for PartyShares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idx: Vec<usize> = self.shares.iter().map(|(i, _)| *i).collect();
        write!(
            f,
            "PartyShares {{ party: {}, shares: {idx:?} (redacted) }}",
            self.party
        )
    }
}

fn random_u128(rng: &mut impl RngCore) -> u128 {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    u128::from_le_bytes(b)
}

/// Splits `secret` into C(n, t−1) uniformly random shares that sum to it (mod 2^128) and
/// hands each party the shares it holds.
pub fn split(secret: &[u128], scheme: Scheme, rng: &mut impl RngCore) -> Vec<PartyShares> {
    let count = scheme.share_count();
    let mut shares: Vec<Vec<u128>> = Vec::with_capacity(count);
    let mut last: Vec<u128> = secret.to_vec();
    for _ in 0..count - 1 {
        let r: Vec<u128> = (0..secret.len()).map(|_| random_u128(rng)).collect();
        for (l, x) in last.iter_mut().zip(&r) {
            *l = l.wrapping_sub(*x);
        }
        shares.push(r);
    }
    shares.push(last);
    let out = (0..scheme.parties())
        .map(|p| PartyShares {
            party: p,
            shares: scheme
                .held_by(p)
                .into_iter()
                .map(|i| (i, shares[i].clone()))
                .collect(),
        })
        .collect();
    for s in &mut shares {
        s.zeroize();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_t_hold_everything_t_minus_1_do_not() {
        for (n, t) in [(3, 2), (3, 3), (5, 3), (7, 4)] {
            let s = Scheme::new(n, t).unwrap();
            let count = s.share_count();
            for mask in 0u32..(1 << n) {
                let members: Vec<usize> = (0..n).filter(|p| mask & (1 << p) != 0).collect();
                let covered = (0..count).all(|i| members.iter().any(|p| s.holds(*p, i)));
                assert_eq!(
                    covered,
                    members.len() >= t,
                    "{t}-of-{n} parties {members:?}"
                );
            }
        }
    }

    #[test]
    fn shares_sum_to_secret() {
        let s = Scheme::new(5, 3).unwrap();
        let secret: Vec<u128> = (0..64).map(|i| i % 2).collect();
        let parts = split(&secret, s, &mut rand::rngs::OsRng);
        let mut all: Vec<Option<Vec<u128>>> = vec![None; s.share_count()];
        for p in &parts {
            for (i, r) in &p.shares {
                if let Some(prev) = &all[*i] {
                    assert_eq!(prev, r, "two parties got different copies of share {i}");
                }
                all[*i] = Some(r.clone());
            }
        }
        let mut sum = vec![0u128; secret.len()];
        for r in all.into_iter().map(Option::unwrap) {
            for (a, b) in sum.iter_mut().zip(r) {
                *a = a.wrapping_add(b);
            }
        }
        assert_eq!(sum, secret);
    }

    #[test]
    fn bad_schemes() {
        assert!(Scheme::new(3, 1).is_err());
        assert!(Scheme::new(3, 4).is_err());
        assert!(Scheme::new(8, 2).is_err());
        // Two disjoint quorums would each keep their own ledger.
        assert!(Scheme::new(4, 2).is_err());
        assert!(Scheme::new(7, 3).is_err());
        assert!(Scheme::new(7, 4).is_ok());
    }
}
