//! Whether a service's backends sit on a segment of a device lb manages, as two modes need: in
//! DNAT their replies must come back through lb, their gateway (lb cannot see the backends'
//! routes, but it can see its own: a backend reached through a gateway, or on a device lb does
//! not manage, answers clients by a path lb is not on); in DSR L2 a MAC rewrite must reach
//! them. Pure: reads the text of /proc/net/route.

use std::net::Ipv4Addr;

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub device: String,
    pub destination: Ipv4Addr,
    pub prefix_len: u32,
    /// None: on-link.
    pub gateway: Option<Ipv4Addr>,
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
                destination,
                prefix_len: u32::from(mask).count_ones(),
                gateway: (!gateway.is_unspecified()).then_some(gateway),
                metric: metric.parse().ok()?,
            })
        })
        .collect()
}

/// The route the kernel takes towards `addr`: the longest prefix, then the lowest metric.
pub fn route_to(routes: &[Route], addr: Ipv4Addr) -> Option<&Route> {
    let covers = |r: &&Route| {
        let mask = u32::MAX.checked_shl(32 - r.prefix_len).unwrap_or(0);
        u32::from(addr) & mask == u32::from(r.destination) & mask
    };
    routes.iter().filter(covers).max_by(|a, b| {
        a.prefix_len
            .cmp(&b.prefix_len)
            .then(b.metric.cmp(&a.metric))
    })
}

/// Why `backend` is not on a segment of a device lb forwards through (`managed`), if it is
/// not.
pub fn problem(routes: &[Route], backend: Ipv4Addr, managed: &[String]) -> Option<String> {
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
                destination: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                gateway: Some(Ipv4Addr::new(198, 18, 0, 1)),
                metric: 0,
            }
        );
        assert_eq!(routes[1].destination, Ipv4Addr::new(198, 18, 1, 0));
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
        let problem = |a: [u8; 4], routes: &[Route]| problem(routes, Ipv4Addr::from(a), &managed);
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
}
