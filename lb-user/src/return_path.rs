//! Whether a service's backends sit on a segment of a device lb manages, as two modes need: in
//! DNAT their replies must come back through lb, their gateway (lb cannot see the backends'
//! routes, but it can see its own: a backend reached through a gateway, or on a device lb does
//! not manage, answers clients by a path lb is not on); in DSR L2 a MAC rewrite must reach
//! them. Pure: reads the text of /proc/net/route and /proc/net/ipv6_route.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One route of the main table (IPv6: of any table the kernel lists; the longest prefix still
/// decides).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub device: String,
    pub destination: IpAddr,
    pub prefix_len: u32,
    /// None: on-link.
    pub gateway: Option<IpAddr>,
    pub metric: u32,
}

/// The routes of /proc/net/route's text; lines it cannot read are skipped.
pub fn parse_routes(text: &str) -> Vec<Route> {
    // Addresses are the kernel's __be32 printed as a native-endian number.
    let addr = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (device, destination, gateway, metric, mask) = (
                f.first()?,
                addr(f.get(1)?)?,
                addr(f.get(2)?)?,
                f.get(6)?,
                addr(f.get(7)?)?,
            );
            Some(Route {
                device: (*device).to_owned(),
                destination: destination.into(),
                prefix_len: u32::from(mask).count_ones(),
                gateway: (!gateway.is_unspecified()).then_some(gateway.into()),
                metric: metric.parse().ok()?,
            })
        })
        .collect()
}

/// The routes of /proc/net/ipv6_route's text (destination, its prefix length, source, its
/// prefix length, next hop, metric, reference count, use, flags, device; all hexadecimal but
/// the device, addresses as 32 digits in network order); lines it cannot read are skipped.
pub fn parse_routes6(text: &str) -> Vec<Route> {
    let addr = |hex: &str| u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from);
    let number = |hex: &str| u32::from_str_radix(hex, 16).ok();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (destination, prefix_len, gateway, metric, device) = (
                addr(f.first()?)?,
                number(f.get(1)?)?,
                addr(f.get(4)?)?,
                number(f.get(5)?)?,
                f.get(9)?,
            );
            Some(Route {
                device: (*device).to_owned(),
                destination: destination.into(),
                prefix_len,
                gateway: (!gateway.is_unspecified()).then_some(gateway.into()),
                metric,
            })
        })
        .collect()
}

/// The routes of both families as the kernel lists them, or why they could not be read.
pub fn read_routes() -> Result<Vec<Route>, String> {
    let read = |path: &str| std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"));
    let mut routes = parse_routes(&read("/proc/net/route")?);
    // A kernel without IPv6 has no such file, and no IPv6 routes.
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        routes.extend(parse_routes6(&text));
    }
    Ok(routes)
}

/// Whether `addr` lies in `prefix`/`len` (of its own family).
fn covers(prefix: IpAddr, len: u32, addr: IpAddr) -> bool {
    match (prefix, addr) {
        (IpAddr::V4(p), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0);
            u32::from(a) & mask == u32::from(p) & mask
        }
        (IpAddr::V6(p), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - len.min(128)).unwrap_or(0);
            u128::from(a) & mask == u128::from(p) & mask
        }
        _ => false,
    }
}

/// The route the kernel takes towards `addr`: the longest prefix, then the lowest metric.
pub fn route_to(routes: &[Route], addr: impl Into<IpAddr>) -> Option<&Route> {
    let addr = addr.into();
    routes
        .iter()
        .filter(|r| covers(r.destination, r.prefix_len, addr))
        .max_by(|a, b| {
            a.prefix_len
                .cmp(&b.prefix_len)
                .then(b.metric.cmp(&a.metric))
        })
}

/// Why `backend` is not on a segment of a device lb forwards through (`managed`), if it is
/// not.
pub fn problem(routes: &[Route], backend: IpAddr, managed: &[String]) -> Option<String> {
    let Some(route) = route_to(routes, backend) else {
        return Some(format!("lb has no route to backend {backend}"));
    };
    if let Some(gateway) = route.gateway {
        return Some(format!(
            "backend {backend} is reached through gateway {gateway} on {}",
            route.device
        ));
    }
    if !managed.contains(&route.device) {
        return Some(format!(
            "backend {backend} is on {}, a device lb does not forward through",
            route.device
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth1\t000112C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth2\t000212C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t000312C6\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
eth2\t000312C6\t00000000\t0001\t0\t0\t10\t00FFFFFF\t0\t0\t0
bad line
";

    #[test]
    fn routes_are_read_as_the_kernel_prints_them() {
        let routes = parse_routes(ROUTES);
        assert_eq!(routes.len(), 5);
        assert_eq!(
            routes[0],
            Route {
                device: "eth0".into(),
                destination: Ipv4Addr::UNSPECIFIED.into(),
                prefix_len: 0,
                gateway: Some(Ipv4Addr::new(198, 18, 0, 1).into()),
                metric: 0,
            }
        );
        assert_eq!(routes[1].destination, IpAddr::from([198, 18, 1, 0]));
        assert_eq!(routes[1].prefix_len, 24);
        assert_eq!(routes[1].gateway, None);
    }

    #[test]
    fn the_longest_prefix_then_the_lowest_metric_wins() {
        let routes = parse_routes(ROUTES);
        let device = |a: [u8; 4]| route_to(&routes, Ipv4Addr::from(a)).map(|r| r.device.clone());
        assert_eq!(device([198, 18, 1, 7]).as_deref(), Some("eth1"));
        assert_eq!(device([198, 18, 2, 7]).as_deref(), Some("eth2"));
        assert_eq!(device([198, 18, 3, 7]).as_deref(), Some("eth2"));
        assert_eq!(device([8, 8, 8, 8]).as_deref(), Some("eth0"));
        assert_eq!(route_to(&routes[1..], Ipv4Addr::new(8, 8, 8, 8)), None);
    }

    #[test]
    fn a_backend_needs_an_on_link_route_on_a_managed_device() {
        let routes = parse_routes(ROUTES);
        let managed = vec!["eth0".to_owned(), "eth1".to_owned()];
        let problem = |a: [u8; 4], routes: &[Route]| problem(routes, IpAddr::from(a), &managed);
        assert_eq!(problem([198, 18, 1, 7], &routes), None);
        let via_gateway = problem([10, 0, 0, 1], &routes).expect("a gateway");
        assert!(
            via_gateway.contains("gateway 198.18.0.1 on eth0"),
            "{via_gateway}"
        );
        let unmanaged = problem([198, 18, 2, 7], &routes).expect("an unmanaged device");
        assert!(
            unmanaged.contains("on eth2, a device lb does not"),
            "{unmanaged}"
        );
        let none = problem([10, 0, 0, 1], &routes[1..]).expect("no route");
        assert!(none.contains("no route"), "{none}");
    }

    /// As a kernel lists them: a default route through a gateway, two on-link prefixes, a
    /// host's own address (local table), the unreachable catch-all on lo, multicast.
    const ROUTES6: &str = "\
fd000001000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1
fd000002000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth2
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
fd000001000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1
bad line
";

    #[test]
    fn ipv6_routes_are_read_as_the_kernel_prints_them() {
        let routes = parse_routes6(ROUTES6);
        assert_eq!(routes.len(), 6);
        assert_eq!(
            routes[2],
            Route {
                device: "eth0".into(),
                destination: Ipv6Addr::UNSPECIFIED.into(),
                prefix_len: 0,
                gateway: Some("fd00::1".parse().expect("address")),
                metric: 0x400,
            }
        );
        assert_eq!(
            routes[0].destination,
            "fd00:1::".parse::<IpAddr>().expect("address")
        );
        assert_eq!((routes[0].prefix_len, routes[0].gateway), (64, None));
    }

    #[test]
    fn an_ipv6_backend_needs_an_on_link_route_on_a_managed_device() {
        let routes = parse_routes6(ROUTES6);
        let managed = vec!["eth0".to_owned(), "eth1".to_owned()];
        let problem = |a: &str| problem(&routes, a.parse().expect("address"), &managed);
        assert_eq!(problem("fd00:1::11"), None);
        let via_gateway = problem("2001:db8::1").expect("a gateway");
        assert!(
            via_gateway.contains("gateway fd00::1 on eth0"),
            "{via_gateway}"
        );
        let unmanaged = problem("fd00:2::11").expect("an unmanaged device");
        assert!(
            unmanaged.contains("on eth2, a device lb does not"),
            "{unmanaged}"
        );
        // Both families in one list: each address finds its own family's routes.
        let mut both = parse_routes(ROUTES);
        both.extend(routes.clone());
        assert_eq!(
            route_to(&both, Ipv4Addr::new(8, 8, 8, 8)).map(|r| r.device.as_str()),
            Some("eth0")
        );
        assert_eq!(
            route_to(&both, "fd00:1::11".parse::<IpAddr>().expect("address"))
                .map(|r| r.device.as_str()),
            Some("eth1")
        );
    }
}
