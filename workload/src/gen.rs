//! The synthetic reference workload: mobile attribution events (installs, launches,
//! purchases...) with realistic skew. Apps, media sources, campaigns, countries and devices are
//! Zipf-distributed, devices repeat, revenue comes only with purchases, and a configurable share
//! of events arrives late (event time hours before arrival). The same seed gives the same events.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

use tandem_core::time::{format_us, HOUR_US};

pub const MEDIA_SOURCES: [&str; 16] = [
    "organic",
    "googleadwords_int",
    "Facebook Ads",
    "tiktokglobal_int",
    "applovin_int",
    "unityads_int",
    "ironsource_int",
    "Apple Search Ads",
    "snapchat_int",
    "mintegral_int",
    "moloco_int",
    "liftoff_int",
    "vungle_int",
    "twitter",
    "digitalturbine_int",
    "chartboosts2s_int",
];
pub const COUNTRIES: [&str; 30] = [
    "US", "IN", "BR", "ID", "GB", "DE", "JP", "FR", "MX", "RU", "KR", "TR", "CA", "IT", "ES", "PH",
    "VN", "TH", "AU", "SA", "EG", "NG", "PK", "AR", "PL", "NL", "CO", "ZA", "MY", "UA",
];
const EVENT_NAMES: [(&str, u32); 5] = [
    ("launch", 50),
    ("install", 20),
    ("registration", 12),
    ("level_achieved", 10),
    ("purchase", 8),
];
const PRICES: [(f64, u32); 8] = [
    (0.99, 30),
    (1.99, 22),
    (2.99, 15),
    (4.99, 14),
    (9.99, 9),
    (19.99, 6),
    (49.99, 3),
    (99.99, 1),
];
const CAMPAIGNS_PER_SOURCE: usize = 40;

/// One generated event, as the reference schema defines it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub event_id: String,
    #[serde(serialize_with = "ser_time")]
    pub event_time: i64,
    pub app_id: String,
    pub event_name: &'static str,
    pub media_source: &'static str,
    pub campaign: Option<String>,
    pub country: &'static str,
    pub platform: &'static str,
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revenue_usd: Option<f64>,
}

fn ser_time<S: serde::Serializer>(us: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_us(*us))
}

impl Event {
    /// The event as one JSON line (wire format v1), without the newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialise")
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub seed: u64,
    /// Number of distinct apps.
    pub apps: usize,
    /// Number of distinct devices to draw from (repeat visitors).
    pub devices: usize,
    /// Share of events whose event time is 1 to 36 hours before their arrival.
    pub late_share: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 42,
            apps: 100,
            devices: 200_000,
            late_share: 0.02,
        }
    }
}

/// A deterministic event generator.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: StdRng,
    config: GenConfig,
    app: Zipf<f64>,
    source: Zipf<f64>,
    campaign: Zipf<f64>,
    country: Zipf<f64>,
    device: Zipf<f64>,
}

fn weighted<T: Copy>(rng: &mut StdRng, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total);
    for (item, w) in items {
        if x < *w {
            return *item;
        }
        x -= w;
    }
    items[items.len() - 1].0
}

impl Generator {
    pub fn new(config: GenConfig) -> Self {
        let zipf = |n: usize, s: f64| Zipf::new(n.max(1) as f64, s).expect("valid Zipf parameters");
        Generator {
            rng: StdRng::seed_from_u64(config.seed),
            app: zipf(config.apps, 1.1),
            source: zipf(MEDIA_SOURCES.len(), 1.0),
            campaign: zipf(CAMPAIGNS_PER_SOURCE, 1.2),
            country: zipf(COUNTRIES.len(), 1.1),
            device: zipf(config.devices, 0.8),
            config,
        }
    }

    /// The next event arriving at `arrival_us`.
    pub fn next_at(&mut self, arrival_us: i64) -> Event {
        let rng = &mut self.rng;
        let pick = |z: &Zipf<f64>, rng: &mut StdRng| z.sample(rng) as usize - 1;
        let app = pick(&self.app, rng);
        let source = MEDIA_SOURCES[pick(&self.source, rng)];
        let campaign = (source != "organic").then(|| {
            let slug: String = source.to_ascii_lowercase().replace(' ', "_");
            format!("{slug}_c{:02}", pick(&self.campaign, rng))
        });
        let country = COUNTRIES[pick(&self.country, rng)];
        let device = pick(&self.device, rng) as u64;
        let platform = if device % 20 < 13 { "android" } else { "ios" };
        let event_name = weighted(rng, &EVENT_NAMES);
        let revenue_usd = (event_name == "purchase").then(|| weighted(rng, &PRICES));
        let late = rng.random_bool(self.config.late_share.clamp(0.0, 1.0));
        let event_time = if late {
            arrival_us - rng.random_range(HOUR_US..36 * HOUR_US)
        } else {
            arrival_us
        };
        let id: u128 = rng.random();
        Event {
            event_id: format!("{id:032x}"),
            event_time,
            app_id: format!("com.example.app{app:03}"),
            event_name,
            media_source: source,
            campaign,
            country,
            platform,
            device_id: format!(
                "d-{:010x}",
                device.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24
            ),
            revenue_usd,
        }
    }

    /// `n` events arriving evenly (with jitter) over `[start_us, end_us)`, in arrival order.
    pub fn history(mut self, n: usize, start_us: i64, end_us: i64) -> impl Iterator<Item = Event> {
        let step = (end_us - start_us).max(1) as f64 / n.max(1) as f64;
        (0..n).map(move |i| {
            let jitter = self.rng.random_range(0.0..step);
            let arrival = start_us + (i as f64 * step + jitter) as i64;
            self.next_at(arrival.min(end_us - 1))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn same_seed_same_events_and_skewed() {
        let a: Vec<_> = Generator::new(GenConfig::default())
            .history(5_000, 0, 1_000_000_000)
            .collect();
        let b: Vec<_> = Generator::new(GenConfig::default())
            .history(5_000, 0, 1_000_000_000)
            .collect();
        assert_eq!(a, b);
        let c: Vec<_> = Generator::new(GenConfig {
            seed: 7,
            ..Default::default()
        })
        .history(5_000, 0, 1_000_000_000)
        .collect();
        assert_ne!(a, c);
        let mut per_app: HashMap<&str, usize> = HashMap::new();
        for e in &a {
            *per_app.entry(&e.app_id).or_default() += 1;
            assert_eq!(e.revenue_usd.is_some(), e.event_name == "purchase");
            assert_eq!(e.campaign.is_none(), e.media_source == "organic");
        }
        let top = per_app.values().max().unwrap();
        assert!(
            *top > 5_000 / 100 * 5,
            "the top app should dominate, got {top}"
        );
        let devices: std::collections::HashSet<_> = a.iter().map(|e| &e.device_id).collect();
        assert!(devices.len() < a.len(), "devices repeat");
        let late = a
            .iter()
            .enumerate()
            .filter(|(i, e)| e.event_time < *i as i64 * 200_000 - HOUR_US)
            .count();
        assert!(late > 0);
    }

    #[test]
    fn json_lines_have_the_reference_fields() {
        let e = Generator::new(GenConfig::default()).next_at(1_764_075_600_000_000);
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        for k in [
            "event_id",
            "event_time",
            "app_id",
            "event_name",
            "media_source",
            "country",
            "platform",
            "device_id",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }
}
