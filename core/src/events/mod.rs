//! The event bus: plugins, kiln, the admin API and PostgreSQL publish `(topic, JSON)` events;
//! plugins subscribe to topic patterns and get them delivered.
//!
//! Delivery is in process and at most once. Each subscription has its own bounded queue and its
//! own task, which hands the events to the plugin one at a time, in publish order, on the
//! blocking pool, each within the subscription's timeout. A publisher never waits: a full queue
//! drops the event for that subscriber (counted and logged). A subscriber that fails, panics or
//! runs past its timeout is counted and logged; the others never notice.
//!
//! Subscriptions a plugin declares belong to the plugin, not to one loaded version of it: their
//! queues outlive a reload, and each event goes to the version serving when it is delivered, so
//! a reload loses no event and delivers none twice. Unloading the plugin ends them.

mod bus;
pub mod outbox;
pub mod topic;

pub use bus::{Delivery, Event, EventBus, Outcome, Source, SubscriberStats};

/// How long a subscriber may take over one event unless configured otherwise
/// (`--event-timeout-ms`'s default).
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
