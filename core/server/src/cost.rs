//! Estimated cost of builds: each attempt's billed span on its instance × the price of its
//! instance type and market, from a price table (`[prices]` in `stagely.toml`, defaulting to
//! the design's instance types at AWS us-east-1 Linux on-demand list prices). Pure: the span
//! comes from the store, the clock is passed in.

use std::collections::BTreeMap;

/// USD per hour of one instance type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub on_demand: f64,
    /// The spot price to estimate with; `None`: the on-demand price (an upper bound).
    pub spot: Option<f64>,
}

/// Instance type → price.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable(pub BTreeMap<String, Price>);

/// EC2 bills a Linux instance per second, at least one minute per launch.
pub const MINIMUM_BILLED_SECONDS: u64 = 60;

impl Default for PriceTable {
    /// The design's instance types (small/medium/large × amd64/arm64), us-east-1 on-demand.
    fn default() -> PriceTable {
        let on_demand = |on_demand| Price {
            on_demand,
            spot: None,
        };
        PriceTable(BTreeMap::from([
            ("t3.small".to_string(), on_demand(0.0208)),
            ("t4g.small".to_string(), on_demand(0.0168)),
            ("c5.xlarge".to_string(), on_demand(0.17)),
            ("c6g.xlarge".to_string(), on_demand(0.136)),
            ("c5.2xlarge".to_string(), on_demand(0.34)),
            ("c6g.2xlarge".to_string(), on_demand(0.272)),
        ]))
    }
}

impl PriceTable {
    /// USD per hour for `instance_type` on `market` (`spot` or `on-demand`), if known.
    pub fn hourly(&self, instance_type: &str, market: Option<&str>) -> Option<f64> {
        let price = self.0.get(instance_type)?;
        Some(match market {
            Some("spot") => price.spot.unwrap_or(price.on_demand),
            _ => price.on_demand,
        })
    }

    /// Estimated USD for one attempt billed `seconds` on `instance_type`/`market`.
    pub fn cost(&self, instance_type: &str, market: Option<&str>, seconds: u64) -> Option<f64> {
        let hourly = self.hourly(instance_type, market)?;
        Some(round_cents_fraction(hourly * seconds as f64 / 3600.0))
    }
}

/// Seconds an attempt is billed: from `from` until `until` (or `now` while it runs), rounded
/// up, at least a minute for the attempt that launched the instance (`launched`; a merge
/// handed over to its last builder's instance adds only its own span).
pub fn billed_seconds(from: i64, until: Option<i64>, now: i64, launched: bool) -> u64 {
    let end = until.unwrap_or(now).max(from);
    let seconds = ((end - from) as u64).div_ceil(1000);
    if launched {
        seconds.max(MINIMUM_BILLED_SECONDS)
    } else {
        seconds
    }
}

/// Keeps estimates readable: four decimal places (a hundredth of a cent).
fn round_cents_fraction(usd: f64) -> f64 {
    (usd * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_is_per_second_with_a_minute_minimum_per_launch() {
        assert_eq!(billed_seconds(0, Some(1), 0, true), 60);
        assert_eq!(billed_seconds(0, Some(90_001), 0, true), 91);
        assert_eq!(
            billed_seconds(0, Some(1_500), 0, false),
            2,
            "a handover: its own span"
        );
        assert_eq!(
            billed_seconds(0, None, 120_000, true),
            120,
            "running: until now"
        );
        assert_eq!(
            billed_seconds(5_000, Some(1_000), 0, false),
            0,
            "a clock step back"
        );
    }

    #[test]
    fn cost_uses_the_market_price_and_falls_back_to_on_demand() {
        let mut table = PriceTable::default();
        assert_eq!(table.cost("c5.xlarge", Some("on-demand"), 3600), Some(0.17));
        assert_eq!(table.cost("c5.xlarge", Some("spot"), 1800), Some(0.085));
        table.0.insert(
            "c5.xlarge".into(),
            Price {
                on_demand: 0.17,
                spot: Some(0.06),
            },
        );
        assert_eq!(table.cost("c5.xlarge", Some("spot"), 3600), Some(0.06));
        assert_eq!(
            table.cost("local", None, 3600),
            None,
            "unknown type: no estimate"
        );
    }
}
