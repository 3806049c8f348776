//! IPv4/IPv6 prefixes: containment and overlap, for the routing and IPAM rules.

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// `10.42.0.0/16`; a bare address is its host prefix (/32, /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max)?,
        };
        Some(Cidr { addr, len })
    }

    fn bits(&self) -> (u128, u8) {
        match self.addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    fn mask(len: u8, width: u8) -> u128 {
        if len == 0 {
            0
        } else {
            (!0u128 << (width - len)) & if width == 32 { 0xffff_ffff } else { !0 }
        }
    }

    /// The network (address with host bits cleared).
    pub fn network(&self) -> Cidr {
        let (b, w) = self.bits();
        let n = b & Self::mask(self.len, w);
        let addr = if w == 32 {
            IpAddr::V4((n as u32).into())
        } else {
            IpAddr::V6(n.into())
        };
        Cidr {
            addr,
            len: self.len,
        }
    }

    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.contains(&Cidr {
            addr: ip,
            len: if ip.is_ipv4() { 32 } else { 128 },
        })
    }

    /// `other` lies wholly inside this prefix.
    pub fn contains(&self, other: &Cidr) -> bool {
        let ((a, wa), (b, wb)) = (self.bits(), other.bits());
        wa == wb && other.len >= self.len && (a ^ b) & Self::mask(self.len, wa) == 0
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other) || other.contains(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::Cidr;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn containment_and_overlap() {
        assert!(c("10.0.0.0/8").contains(&c("10.42.0.0/16")));
        assert!(!c("10.42.0.0/16").contains(&c("10.0.0.0/8")));
        assert!(c("10.42.0.0/16").overlaps(&c("10.0.0.0/8")));
        assert!(!c("10.42.0.0/16").overlaps(&c("10.43.0.0/16")));
        assert!(c("0.0.0.0/0").contains(&c("192.0.2.1")));
        assert!(c("198.18.2.7/24").contains_ip("198.18.2.200".parse().unwrap()));
        assert!(!c("198.18.2.7/24").contains_ip("198.18.3.1".parse().unwrap()));
        assert_eq!(c("198.18.2.7/24").network().to_string(), "198.18.2.0/24");
        assert!(!c("10.0.0.0/8").overlaps(&c("fd00::/8")));
        assert!(c("fd00::/8").contains(&c("fd00:10::/64")));
        assert!(Cidr::parse("10.0.0.0/33").is_none() && Cidr::parse("nope/8").is_none());
    }
}
