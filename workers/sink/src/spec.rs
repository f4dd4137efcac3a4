//! The collection catalog: every documented collection of seed 000
//! (`mathematricks_trading`) and seed 001 (`bot_core_db`), plus the few mtx
//! adds for the audit trail, as data.
//!
//! One table per collection lists its fields with their BSON types and the
//! seed's validation rules, its indexes (exact keys, order, `unique`,
//! `sparse`, TTL) and, for `market_data`, its time-series options. Both
//! [`crate::migrate`] (validators, indexes, collection options) and the sink's
//! JSON → BSON conversion ([`crate::convert`]) read it, so the types the sink
//! writes and the types the validator accepts cannot drift apart.
//!
//! Type mapping: seed `ISODate` / `DateTime` → BSON date; money, prices and
//! quantities → Decimal128 (in the collections mtx writes, and wherever seed
//! 001 says `Decimal128`); ratios and statistics → double; seed 000's generic
//! `Number` in collections other stages own → any numeric BSON type.
//!
//! Paths: `a.b` is a nested field, `a.[]` the elements of array `a`, `a.*`
//! the values of a map-like object `a` (e.g. `allocations`).

use bson::{doc, Bson, Document};
use std::collections::HashMap;
use std::sync::OnceLock;

/// The schema version this build migrates to (recorded in `system_config`).
pub const SCHEMA_VERSION: &str = "1.3.0";

/// Every schema version, oldest first, with what it introduced.
pub const VERSIONS: &[(&str, &str)] = &[
    (
        "1.0.0",
        "Bot Core schema 1.0.0: seed collections, indexes and TTLs",
    ),
    (
        "1.1.0",
        "mtx pipeline: natural-key unique indexes, $jsonSchema validators, dead_letters, order_events, order_cancels, trading_orders.status_rank",
    ),
    (
        "1.2.0",
        "account_state.strategy_pnl_today (Decimal128 per strategy), cerebro_decisions.risk_assessment.cvar_skipped",
    ),
    (
        "1.3.0",
        "trading_orders.status within the seed's five values, the state machine's status in venue_status; strategy_backtest_data max_drawdown and win_rate in percent; the schema version filed under system_config category features",
    ),
];

/// The `system_config` key under which the schema version is recorded.
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Collection names, so no other module spells them.
pub mod names {
    /// Raw incoming signals (seed 000).
    pub const RAW_SIGNALS: &str = "raw_signals";
    /// Standardized signals (seed 000).
    pub const STANDARDIZED_SIGNALS: &str = "standardized_signals";
    /// Sized orders (seed 000).
    pub const TRADING_ORDERS: &str = "trading_orders";
    /// Fills, partial fills and rejections (seed 000).
    pub const EXECUTION_CONFIRMATIONS: &str = "execution_confirmations";
    /// Account snapshots (seed 000).
    pub const ACCOUNT_STATE: &str = "account_state";
    /// Cerebro's decisions (seed 000).
    pub const CEREBRO_DECISIONS: &str = "cerebro_decisions";
    /// Backtest series per strategy (seed 000).
    pub const STRATEGY_BACKTEST_DATA: &str = "strategy_backtest_data";
    /// Portfolio allocations (seed 000).
    pub const PORTFOLIO_ALLOCATIONS: &str = "portfolio_allocations";
    /// Optimizer runs (seed 000).
    pub const PORTFOLIO_OPTIMIZATION_RUNS: &str = "portfolio_optimization_runs";
    /// Strategy registry (seed 000).
    pub const STRATEGY_CONFIGURATIONS: &str = "strategy_configurations";
    /// mtx: every order status transition (the audit trail behind `trading_orders.status`).
    pub const ORDER_EVENTS: &str = "order_events";
    /// mtx: cancel requests published on `orders.<account>.cancel`.
    pub const ORDER_CANCELS: &str = "order_cancels";
    /// mtx: every dead letter of every stage.
    pub const DEAD_LETTERS: &str = "dead_letters";
    /// Bot Core: global settings, and the schema version.
    pub const SYSTEM_CONFIG: &str = "system_config";
    /// Bot Core: audit trail (the `AUDIT` stream lands here).
    pub const AUDIT_LOGS: &str = "audit_logs";
    /// Bot Core: OHLCV candles (time series).
    pub const MARKET_DATA: &str = "market_data";
}

/// Which configured database a collection lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Db {
    /// `mongo.trading_db` (seed 000, `mathematricks_trading`).
    Trading,
    /// `mongo.bot_core_db` (seed 001, `bot_core_db`).
    BotCore,
}

/// The BSON type of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// UTF-8 string.
    Str,
    /// Boolean.
    Bool,
    /// BSON date (UTC milliseconds).
    Date,
    /// Decimal128: money, prices, quantities (exact).
    Dec,
    /// Double: ratios and statistics.
    Dbl,
    /// 32- or 64-bit integer (counts, sequences).
    Int,
    /// Any numeric type (seed 000 `Number` in collections other stages own).
    Num,
    /// Embedded document.
    Obj,
    /// Array.
    Arr,
    /// ObjectId.
    Oid,
    /// Anything (`value: any`).
    Any,
}

impl Ty {
    /// `$jsonSchema` `bsonType` alias(es), `None` for [`Ty::Any`].
    pub fn bson_types(self) -> Option<&'static [&'static str]> {
        Some(match self {
            Ty::Str => &["string"],
            Ty::Bool => &["bool"],
            Ty::Date => &["date"],
            Ty::Dec => &["decimal"],
            Ty::Dbl => &["double"],
            Ty::Int => &["int", "long"],
            Ty::Num => &["double", "int", "long", "decimal"],
            Ty::Obj => &["object"],
            Ty::Arr => &["array"],
            Ty::Oid => &["objectId"],
            Ty::Any => return None,
        })
    }
}

/// One field of a collection and its validation rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// Dotted path (`a.b`, `a.[]`, `a.*`).
    pub path: &'static str,
    /// BSON type.
    pub ty: Ty,
    /// Must be present.
    pub required: bool,
    /// May be `null`.
    pub nullable: bool,
    /// Allowed string values (empty = any).
    pub enum_values: &'static [&'static str],
    /// Numeric lower bound.
    pub minimum: Option<f64>,
    /// The lower bound is exclusive (`> minimum`).
    pub exclusive_minimum: bool,
    /// Numeric upper bound (inclusive).
    pub maximum: Option<f64>,
    /// Regular expression a string must match.
    pub pattern: Option<&'static str>,
    /// Minimum string length.
    pub min_length: Option<u32>,
}

fn f(path: &'static str, ty: Ty) -> Field {
    Field {
        path,
        ty,
        required: false,
        nullable: false,
        enum_values: &[],
        minimum: None,
        exclusive_minimum: false,
        maximum: None,
        pattern: None,
        min_length: None,
    }
}

impl Field {
    fn req(mut self) -> Self {
        self.required = true;
        self
    }
    fn null(mut self) -> Self {
        self.nullable = true;
        self
    }
    fn enums(mut self, v: &'static [&'static str]) -> Self {
        self.enum_values = v;
        self
    }
    fn min(mut self, m: f64) -> Self {
        self.minimum = Some(m);
        self
    }
    fn gt(mut self, m: f64) -> Self {
        self.minimum = Some(m);
        self.exclusive_minimum = true;
        self
    }
    fn max(mut self, m: f64) -> Self {
        self.maximum = Some(m);
        self
    }
    fn pattern(mut self, p: &'static str) -> Self {
        self.pattern = Some(p);
        self
    }
    fn min_len(mut self, n: u32) -> Self {
        self.min_length = Some(n);
        self
    }
}

/// One index: keys in order (1 / -1), options as the seed writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexSpec {
    /// Keys in order with direction.
    pub keys: Vec<(&'static str, i32)>,
    /// `unique: true`.
    pub unique: bool,
    /// `sparse: true`.
    pub sparse: bool,
    /// TTL `expireAfterSeconds`.
    pub ttl: Option<i64>,
}

impl IndexSpec {
    /// MongoDB's default name: `a_1_b_-1`.
    pub fn name(&self) -> String {
        self.keys
            .iter()
            .map(|(k, d)| format!("{k}_{d}"))
            .collect::<Vec<_>>()
            .join("_")
    }

    /// The key document, in order.
    pub fn key_doc(&self) -> Document {
        let mut d = Document::new();
        for (k, dir) in &self.keys {
            d.insert(*k, *dir);
        }
        d
    }
}

fn ix(keys: &[(&'static str, i32)]) -> IndexSpec {
    IndexSpec {
        keys: keys.to_vec(),
        unique: false,
        sparse: false,
        ttl: None,
    }
}

impl IndexSpec {
    fn unique(mut self) -> Self {
        self.unique = true;
        self
    }
    fn sparse(mut self) -> Self {
        self.sparse = true;
        self
    }
    fn ttl(mut self, secs: i64) -> Self {
        self.ttl = Some(secs);
        self
    }
}

/// Time-series collection options.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeSeries {
    /// `timeField`.
    pub time_field: &'static str,
    /// `metaField`.
    pub meta_field: &'static str,
    /// `granularity`.
    pub granularity: &'static str,
    /// Collection-level `expireAfterSeconds`.
    pub expire_after_seconds: i64,
}

/// Who writes a collection, which decides how strict its validator is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// The sink: exact types, required fields enforced.
    Sink,
    /// Another stage or tool: types enforced where the seed is specific,
    /// only the natural key required.
    Other,
}

/// One collection: where it lives, its fields, indexes and options.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionSpec {
    /// Name.
    pub name: &'static str,
    /// Database.
    pub db: Db,
    /// Who writes it.
    pub writer: Writer,
    /// Fields in document order (the seed's order first).
    pub fields: Vec<Field>,
    /// Indexes (besides `_id`).
    pub indexes: Vec<IndexSpec>,
    /// Time-series options (`market_data`).
    pub timeseries: Option<TimeSeries>,
    /// Rules that are documented but cannot be expressed in a validator of
    /// this collection (time-series collections take no validator); listed by
    /// `mtx db migrate`.
    pub unenforced_rules: &'static [&'static str],
}

impl CollectionSpec {
    /// The field at `path`, if declared.
    pub fn field(&self, path: &str) -> Option<&Field> {
        field_index(self).get(path).map(|&i| &self.fields[i])
    }

    /// The `$jsonSchema` validator, or `None` when the collection takes none
    /// (time series) or declares no fields.
    pub fn validator(&self) -> Option<Document> {
        if self.timeseries.is_some() || self.fields.is_empty() {
            return None;
        }
        let mut root = SchemaNode::default();
        for fld in &self.fields {
            let segs: Vec<&str> = fld.path.split('.').collect();
            root.insert(&segs, fld);
        }
        Some(doc! { "$jsonSchema": root.render(true) })
    }
}

#[derive(Default)]
struct SchemaNode {
    field: Option<Field>,
    props: Vec<(String, SchemaNode)>,
    items: Option<Box<SchemaNode>>,
    values: Option<Box<SchemaNode>>,
}

impl SchemaNode {
    fn insert(&mut self, segs: &[&str], fld: &Field) {
        let Some((head, rest)) = segs.split_first() else {
            self.field = Some(fld.clone());
            return;
        };
        let child = match *head {
            "[]" => &mut **self.items.get_or_insert_with(Default::default),
            "*" => &mut **self.values.get_or_insert_with(Default::default),
            name => {
                let pos = self.props.iter().position(|(n, _)| n == name);
                let pos = match pos {
                    Some(p) => p,
                    None => {
                        self.props.push((name.to_string(), SchemaNode::default()));
                        self.props.len() - 1
                    }
                };
                &mut self.props[pos].1
            }
        };
        child.insert(rest, fld);
    }

    fn render(&self, root: bool) -> Document {
        let mut d = Document::new();
        if root {
            d.insert("bsonType", "object");
        } else if let Some(fld) = &self.field {
            if let Some(types) = fld.ty.bson_types() {
                let mut t: Vec<Bson> = types.iter().map(|s| Bson::from(*s)).collect();
                if fld.nullable {
                    t.push("null".into());
                }
                if t.len() == 1 {
                    d.insert("bsonType", t.remove(0));
                } else {
                    d.insert("bsonType", t);
                }
            }
            if !fld.enum_values.is_empty() {
                let mut e: Vec<Bson> = fld.enum_values.iter().map(|s| Bson::from(*s)).collect();
                if fld.nullable {
                    e.push(Bson::Null);
                }
                d.insert("enum", e);
            }
            if let Some(m) = fld.minimum {
                d.insert("minimum", m);
                if fld.exclusive_minimum {
                    d.insert("exclusiveMinimum", true);
                }
            }
            if let Some(m) = fld.maximum {
                d.insert("maximum", m);
            }
            if let Some(p) = fld.pattern {
                d.insert("pattern", p);
            }
            if let Some(n) = fld.min_length {
                d.insert("minLength", n as i64);
            }
        }
        let required: Vec<Bson> = self
            .props
            .iter()
            .filter(|(_, n)| n.field.as_ref().is_some_and(|f| f.required))
            .map(|(name, _)| Bson::from(name.as_str()))
            .collect();
        if !required.is_empty() {
            d.insert("required", required);
        }
        if !self.props.is_empty() {
            let mut props = Document::new();
            for (name, node) in &self.props {
                props.insert(name.as_str(), node.render(false));
            }
            d.insert("properties", props);
        }
        if let Some(items) = &self.items {
            d.insert("items", items.render(false));
        }
        if let Some(values) = &self.values {
            d.insert("additionalProperties", values.render(false));
        }
        d
    }
}

fn field_index(spec: &CollectionSpec) -> &'static HashMap<&'static str, usize> {
    static INDEX: OnceLock<HashMap<&'static str, HashMap<&'static str, usize>>> = OnceLock::new();
    let all = INDEX.get_or_init(|| {
        catalog()
            .iter()
            .map(|c| {
                (
                    c.name,
                    c.fields
                        .iter()
                        .enumerate()
                        .map(|(i, f)| (f.path, i))
                        .collect(),
                )
            })
            .collect()
    });
    static EMPTY: OnceLock<HashMap<&'static str, usize>> = OnceLock::new();
    all.get(spec.name)
        .unwrap_or_else(|| EMPTY.get_or_init(HashMap::new))
}

/// The collection spec named `name`.
pub fn spec(name: &str) -> Option<&'static CollectionSpec> {
    catalog().iter().find(|c| c.name == name)
}

/// Every collection `mtx db migrate` manages, in creation order.
pub fn catalog() -> &'static [CollectionSpec] {
    static CATALOG: OnceLock<Vec<CollectionSpec>> = OnceLock::new();
    CATALOG.get_or_init(build)
}

// Enum spellings, exactly as the seeds (and mtx-schemas) write them.
const DIRECTION: &[&str] = &["LONG", "SHORT"];
const ACTION: &[&str] = &["ENTRY", "EXIT"];
const ORDER_TYPE: &[&str] = &["MARKET", "LIMIT", "STOP"];
const SIDE: &[&str] = &["BUY", "SELL"];
/// Seed 000's `trading_orders.status` values.
const SEED_ORDER_STATUS: &[&str] = &["PENDING", "SUBMITTED", "FILLED", "REJECTED", "CANCELLED"];
/// Every status of the order state machine (`order_events`, `venue_status`).
pub(crate) const ORDER_STATUS: &[&str] = &[
    "PENDING",
    "SUBMITTED",
    "ACCEPTED",
    "PARTIALLY_FILLED",
    "FILLED",
    "CANCEL_REQUESTED",
    "CANCELLED",
    "REJECTED",
    "EXPIRED",
];
const EXECUTION_STATUS: &[&str] = &["FILLED", "PARTIAL_FILL", "REJECTED"];
const DECISION: &[&str] = &["APPROVED", "REJECTED", "MODIFIED"];
const INSTRUMENT_TYPE: &[&str] = &["STOCK", "ETF", "FOREX", "FUTURE", "CRYPTO", "OPTION"];
const SIGNAL_TYPE: &[&str] = &["ENTRY", "EXIT", "CANCEL", "SCALE_IN", "SCALE_OUT"];
const SIZING_MODE: &[&str] = &[
    "SENDER_EQUITY_RATIO",
    "TARGET_WEIGHT",
    "DELTA_UNITS",
    "FIXED_UNITS",
];
const ENVIRONMENT: &[&str] = &["staging", "production"];
const FORMAT: &[&str] = &["MATHEMATRICKS", "TRADINGVIEW"];
const STRATEGY_STATUS: &[&str] = &["ACTIVE", "INACTIVE", "TESTING"];
const TRADING_MODE: &[&str] = &["LIVE", "PAPER"];
const ALLOCATION_STATUS: &[&str] = &["PENDING_APPROVAL", "ACTIVE", "ARCHIVED"];

/// Fields the sink adds to every document it writes (provenance).
fn ingest_fields(v: &mut Vec<Field>) {
    v.push(f("ingest", Ty::Obj));
    v.push(f("ingest.subject", Ty::Str));
    v.push(f("ingest.stream_seq", Ty::Int));
    v.push(f("ingest.msg_id", Ty::Str).null());
}

fn coll(
    name: &'static str,
    db: Db,
    writer: Writer,
    fields: Vec<Field>,
    indexes: Vec<IndexSpec>,
) -> CollectionSpec {
    let mut fields = fields;
    if writer == Writer::Sink {
        ingest_fields(&mut fields);
    }
    CollectionSpec {
        name,
        db,
        writer,
        fields,
        indexes,
        timeseries: None,
        unenforced_rules: &[],
    }
}

/// The legs of a standardized signal.
fn leg_fields() -> Vec<Field> {
    vec![
        f("legs.[]", Ty::Obj),
        f("legs.[].instrument", Ty::Str).req(),
        f("legs.[].instrument_type", Ty::Str).enums(INSTRUMENT_TYPE),
        f("legs.[].side", Ty::Str).enums(SIDE),
        f("legs.[].direction", Ty::Str).enums(DIRECTION),
        f("legs.[].quantity", Ty::Dec).req(),
        f("legs.[].order_type", Ty::Str).enums(ORDER_TYPE),
        f("legs.[].price", Ty::Dec).null(),
        f("legs.[].stop_loss", Ty::Dec).null(),
        f("legs.[].take_profit", Ty::Dec).null(),
        f("legs.[].expiry", Ty::Date).null(),
        f("legs.[].exchange", Ty::Str).null(),
    ]
}

#[allow(clippy::vec_init_then_push)]
fn build() -> Vec<CollectionSpec> {
    use names::*;
    use Db::*;
    use Ty::*;
    use Writer::*;
    let mut out = Vec::new();

    // ---------------------------------------------------------------- seed 000
    out.push(coll(
        RAW_SIGNALS,
        Trading,
        Sink,
        vec![
            f("timestamp", Date).req(),
            f("source", Str).req(),
            f("raw_data", Any).req(),
            f("processed", Bool).req(),
            f("created_at", Date).req(),
            // mtx: natural key (hash of subject and exact bytes), links, envelope.
            f("raw_signal_id", Str).req(),
            f("signal_id", Str).null(),
            f("environment", Str).enums(ENVIRONMENT),
            f("format", Str).enums(FORMAT),
            f("strategy_hint", Str).null(),
            f("instrument_type_hint", Str).enums(INSTRUMENT_TYPE).null(),
            f("fallback_signal_id", Str).null(),
            f("futures_front_month", Bool),
            f("processed_at", Date),
            f("error", Obj).null(),
            f("error.stage", Str),
            f("error.reason", Str),
            f("error.detail", Str),
            f("error.at", Date),
        ],
        vec![
            ix(&[("raw_signal_id", 1)]).unique().sparse(),
            ix(&[("signal_id", 1)]).sparse(),
            ix(&[("timestamp", -1)]),
            ix(&[("processed", 1), ("timestamp", -1)]),
        ],
    ));

    let mut std_fields = vec![
        f("signal_id", Str).req(),
        f("strategy_id", Str).req(),
        f("timestamp", Date).req(),
        f("instrument", Str).req(),
        f("direction", Str).req().enums(DIRECTION),
        f("action", Str).enums(ACTION).null(),
        f("order_type", Str).req().enums(ORDER_TYPE),
        f("price", Dec).null(),
        f("quantity", Dec).req().gt(0.0),
        f("stop_loss", Dec).null(),
        f("take_profit", Dec).null(),
        f("expiry", Date).null(),
        f("metadata", Obj).req(),
        f("metadata.expected_alpha", Dbl).null(),
        f("metadata.backtest_data", Obj).null(),
        f("metadata.warnings", Arr),
        f("metadata.warnings.[]", Str),
        f("processed_by_cerebro", Bool).req(),
        f("created_at", Date).req(),
        // mtx: the rest of the standardized signal.
        f("instrument_type", Str).enums(INSTRUMENT_TYPE),
        f("legs", Arr),
    ];
    std_fields.extend(leg_fields());
    std_fields.extend([
        f("signal_type", Str).enums(SIGNAL_TYPE).null(),
        f("entry_signal_id", Str).null(),
        f("sender_entry_signal_id", Str).null(),
        f("environment", Str).enums(ENVIRONMENT),
        f("source", Str),
        f("sender_signal_id", Str),
        f("signal_sent_at", Date).null(),
        f("received_at", Date),
        f("account_equity", Dec).null(),
        f("sizing_mode", Str).enums(SIZING_MODE),
        f("processed_by_cerebro_at", Date),
    ]);
    out.push(coll(
        STANDARDIZED_SIGNALS,
        Trading,
        Sink,
        std_fields,
        vec![
            ix(&[("signal_id", 1)]).unique(),
            ix(&[("strategy_id", 1), ("timestamp", -1)]),
            ix(&[("processed_by_cerebro", 1)]),
        ],
    ));

    out.push(coll(
        TRADING_ORDERS,
        Trading,
        Sink,
        vec![
            f("order_id", Str).req(),
            f("signal_id", Str).req(),
            f("strategy_id", Str).req(),
            f("account", Str).req(),
            f("timestamp", Date).req(),
            f("instrument", Str).req(),
            f("direction", Str).req().enums(DIRECTION),
            f("action", Str).req().enums(ACTION),
            f("order_type", Str).req().enums(ORDER_TYPE),
            f("price", Dec).null(),
            f("quantity", Dec).req().gt(0.0),
            f("stop_loss", Dec).null(),
            f("take_profit", Dec).null(),
            f("expiry", Date).null(),
            f("cerebro_decision", Obj).null(),
            f("cerebro_decision.allocated_capital", Dec),
            f("cerebro_decision.margin_required", Dec),
            f("cerebro_decision.position_size_logic", Str),
            // Cerebro's per-order numbers: money as Decimal128, ratios as
            // doubles, the contract date as a date (never strings).
            f("cerebro_decision.risk_metrics", Obj),
            f("cerebro_decision.risk_metrics.margin_released", Dec).null(),
            f("cerebro_decision.risk_metrics.closable", Dec).null(),
            f("cerebro_decision.risk_metrics.contract_expiry", Date).null(),
            f("cerebro_decision.risk_metrics.margin_utilization_pct", Dbl).null(),
            f("cerebro_decision.risk_metrics.leverage_after", Dbl).null(),
            f("cerebro_decision.risk_metrics.scale_factor", Dbl).null(),
            f("cerebro_decision.risk_metrics.shrink_factor", Dbl).null(),
            f("cerebro_decision.risk_metrics.cvar_contribution", Dbl).null(),
            f("cerebro_decision.risk_metrics.cvar_after_pct", Dbl).null(),
            f("cerebro_decision.risk_metrics.slippage_alpha_lost", Dbl).null(),
            f("status", Str).req().enums(SEED_ORDER_STATUS),
            f("created_at", Date).req(),
            // mtx
            f("venue_status", Str).enums(ORDER_STATUS),
            f("instrument_type", Str).enums(INSTRUMENT_TYPE),
            f("side", Str).enums(SIDE),
            f("stop_price", Dec).null(),
            f("parent_order_id", Str).null(),
            f("leg", Int),
            f("multiplier", Dec),
            f("status_rank", Int).req(),
            f("status_seq", Int),
            f("status_reason", Str).null(),
            f("status_at", Date),
            f("filled_quantity", Dec),
            f("avg_fill_price", Dec).null(),
            f("updated_at", Date),
        ],
        vec![
            ix(&[("order_id", 1)]).unique(),
            ix(&[("signal_id", 1)]),
            ix(&[("account", 1), ("status", 1)]),
            ix(&[("strategy_id", 1), ("timestamp", -1)]),
        ],
    ));

    out.push(coll(
        EXECUTION_CONFIRMATIONS,
        Trading,
        Sink,
        vec![
            f("order_id", Str).req(),
            f("execution_id", Str).req(),
            f("timestamp", Date).req(),
            f("account", Str).req(),
            f("instrument", Str).req(),
            f("side", Str).req().enums(SIDE),
            f("quantity", Dec).req().min(0.0),
            f("price", Dec).req().min(0.0),
            f("commission", Dec).req(),
            f("status", Str).req().enums(EXECUTION_STATUS),
            f("broker_response", Any),
            f("created_at", Date).req(),
            // mtx
            f("strategy_id", Str),
            f("instrument_type", Str).enums(INSTRUMENT_TYPE),
            f("direction", Str).enums(DIRECTION),
            f("action", Str).enums(ACTION),
            f("multiplier", Dec),
        ],
        vec![
            ix(&[("execution_id", 1)]).unique(),
            ix(&[("order_id", 1)]),
            ix(&[("account", 1), ("timestamp", -1)]),
        ],
    ));

    out.push(coll(
        ACCOUNT_STATE,
        Trading,
        Sink,
        vec![
            f("account", Str).req(),
            f("timestamp", Date).req(),
            f("equity", Dec).req(),
            f("cash_balance", Dec).req(),
            f("margin_used", Dec).req(),
            f("margin_available", Dec).req(),
            f("unrealized_pnl", Dec).req(),
            f("realized_pnl", Dec).req(),
            f("open_positions", Arr).req(),
            f("open_positions.[]", Obj),
            f("open_positions.[].instrument", Str).req(),
            f("open_positions.[].quantity", Dec).req(),
            f("open_positions.[].entry_price", Dec).req(),
            f("open_positions.[].current_price", Dec).req(),
            f("open_positions.[].unrealized_pnl", Dec).req(),
            f("open_positions.[].margin_required", Dec).req(),
            f("open_positions.[].strategy_id", Str),
            f("open_positions.[].direction", Str).enums(DIRECTION),
            f("open_positions.[].multiplier", Dec),
            f("open_orders", Arr).req(),
            f("open_orders.[]", Obj),
            f("open_orders.[].order_id", Str).req(),
            f("open_orders.[].instrument", Str).req(),
            f("open_orders.[].side", Str).req().enums(SIDE),
            f("open_orders.[].quantity", Dec).req(),
            f("open_orders.[].order_type", Str).req().enums(ORDER_TYPE),
            f("open_orders.[].price", Dec).null(),
            f("created_at", Date).req(),
            // mtx
            f("snapshot_id", Str).req(),
            f("commissions", Dec),
            f("deployed_capital", Obj),
            f("deployed_capital.*", Dec),
            f("strategy_pnl_today", Obj),
            f("strategy_pnl_today.*", Dec),
        ],
        vec![
            ix(&[("snapshot_id", 1)]).unique().sparse(),
            ix(&[("account", 1), ("timestamp", -1)]),
        ],
    ));

    out.push(coll(
        CEREBRO_DECISIONS,
        Trading,
        Sink,
        vec![
            f("signal_id", Str).req(),
            f("decision", Str).req().enums(DECISION),
            f("timestamp", Date).req(),
            f("reason", Str).req(),
            f("original_quantity", Dec).req(),
            f("final_quantity", Dec).req(),
            f("risk_assessment", Obj).req(),
            f("risk_assessment.portfolio_margin_before", Dec).null(),
            f("risk_assessment.portfolio_margin_after", Dec).null(),
            f("risk_assessment.margin_utilization_pct", Dbl).null(),
            f("risk_assessment.cvar_contribution", Dbl).null(),
            f("risk_assessment.correlation_impact", Obj).null(),
            f("created_at", Date).req(),
            // mtx: natural key and the decision's numbers.
            f("decision_id", Str).req(),
            f("strategy_id", Str),
            f("account", Str).null(),
            f("environment", Str).enums(ENVIRONMENT),
            f("trading_mode", Str).enums(TRADING_MODE).null(),
            f("signal_type", Str).enums(SIGNAL_TYPE).null(),
            f("action", Str).enums(ACTION).null(),
            f("entry_signal_id", Str).null(),
            f("reason_code", Str),
            // The typed reason: its amounts as Decimal128 (a count limit
            // too), its ratios as doubles.
            f("reason_detail", Obj).null(),
            f("reason_detail.code", Str),
            f("reason_detail.required", Dec),
            f("reason_detail.available", Dec),
            f("reason_detail.allocated", Dec),
            f("reason_detail.deployed", Dec),
            f("reason_detail.reserved", Dec),
            f("reason_detail.equity", Dec),
            f("reason_detail.requested", Dec),
            f("reason_detail.quantity", Dec),
            f("reason_detail.open", Dec),
            f("reason_detail.held", Dec),
            f("reason_detail.lot_size", Dec),
            f("reason_detail.target", Dec),
            f("reason_detail.limit", Dec),
            f("reason_detail.actual", Dec),
            f("reason_detail.limit_pct", Dbl),
            f("reason_detail.actual_pct", Dbl),
            f("reason_detail.allocation_pct", Dbl),
            f("reason_detail.fraction", Dbl),
            f("reason_detail.expected_alpha", Dbl),
            f("reason_detail.price_drift", Dbl),
            f("reason_detail.delay_secs", Dbl),
            f("legs", Arr),
            f("legs.[]", Obj),
            f("legs.[].side", Str).enums(SIDE),
            f("legs.[].direction", Str).enums(DIRECTION),
            f("legs.[].action", Str).enums(ACTION),
            f("legs.[].order_type", Str).enums(ORDER_TYPE),
            f("legs.[].instrument_type", Str).enums(INSTRUMENT_TYPE),
            f("legs.[].leg", Int),
            f("legs.[].sender_quantity", Dec),
            f("legs.[].original_quantity", Dec),
            f("legs.[].final_quantity", Dec),
            f("legs.[].price", Dec).null(),
            f("legs.[].multiplier", Dec),
            f("legs.[].lot_size", Dec),
            f("legs.[].margin_required", Dec),
            f("legs.[].notional", Dec),
            f("risk_assessment.account_equity", Dec).null(),
            f("risk_assessment.allocation_id", Str).null(),
            f("risk_assessment.allocation_pct", Dbl).null(),
            f("risk_assessment.allocated_capital", Dec).null(),
            f("risk_assessment.deployed_capital", Dec).null(),
            f("risk_assessment.reserved_capital", Dec).null(),
            f("risk_assessment.available_capital", Dec).null(),
            f("risk_assessment.margin_required", Dec).null(),
            f("risk_assessment.margin_released", Dec).null(),
            f("risk_assessment.gross_exposure_before", Dec).null(),
            f("risk_assessment.gross_exposure_after", Dec).null(),
            f("risk_assessment.leverage_after", Dbl).null(),
            f("risk_assessment.scale_factor", Dbl).null(),
            f("risk_assessment.shrink_factor", Dbl).null(),
            f("risk_assessment.binding_limit", Str).null(),
            f("risk_assessment.pnl_today", Dec).null(),
            f("risk_assessment.slippage", Obj).null(),
            f("risk_assessment.slippage.evaluated", Bool),
            f("risk_assessment.slippage.expected_alpha", Dbl).null(),
            f("risk_assessment.slippage.delay_secs", Dbl),
            f("risk_assessment.slippage.horizon_secs", Int),
            f("risk_assessment.slippage.alpha_lost_to_delay", Dbl),
            f("risk_assessment.slippage.price_drift", Dbl),
            f("risk_assessment.slippage.alpha_lost", Dbl),
            f("risk_assessment.slippage.limit", Dbl).null(),
            f("risk_assessment.slippage.fraction", Dbl),
            f("risk_assessment.slippage.legs_with_mark", Int),
            f("risk_assessment.cvar_skipped", Obj).null(),
            f("risk_assessment.cvar_skipped.code", Str),
        ],
        vec![
            ix(&[("decision_id", 1)]).unique().sparse(),
            ix(&[("signal_id", 1)]),
            ix(&[("decision", 1), ("timestamp", -1)]),
        ],
    ));

    out.push(coll(
        STRATEGY_BACKTEST_DATA,
        Trading,
        Other,
        vec![
            f("strategy_id", Str).req(),
            f("backtest_period", Obj).null(),
            f("backtest_period.start_date", Date).null(),
            f("backtest_period.end_date", Date).null(),
            f("backtest_period.total_days", Num).null(),
            f("daily_returns", Arr).null(),
            f("daily_returns.[]", Num),
            f("mean_return_daily", Num).null(),
            f("volatility_daily", Num).null(),
            f("sharpe_ratio", Num).null(),
            f("max_drawdown", Num).null(),
            f("win_rate", Num).null(),
            f("margin_per_unit", Num).null(),
            f("metadata", Obj).null(),
            f("metadata.instrument", Str).null(),
            f("metadata.backtest_source", Str).null(),
            f("metadata.notes", Str).null(),
            f("created_at", Date).null(),
            f("updated_at", Date).null(),
        ],
        vec![ix(&[("strategy_id", 1)]).unique()],
    ));

    let metrics = |p: &'static [&'static str]| -> Vec<Field> {
        p.iter().map(|path| f(path, Num).null()).collect()
    };
    let mut alloc = vec![
        f("allocation_id", Str).req(),
        f("timestamp", Date).null(),
        f("status", Str).enums(ALLOCATION_STATUS),
        f("allocations", Obj).null(),
        f("allocations.*", Num),
        f("expected_metrics", Obj).null(),
    ];
    alloc.extend(metrics(&[
        "expected_metrics.expected_daily_return",
        "expected_metrics.expected_daily_volatility",
        "expected_metrics.expected_sharpe_daily",
        "expected_metrics.expected_sharpe_annual",
        "expected_metrics.total_allocation_pct",
        "expected_metrics.leverage_ratio",
    ]));
    alloc.extend([
        f("optimization_run_id", Str).null(),
        f("approved_by", Str).null(),
        f("approved_at", Date).null(),
        f("archived_at", Date).null(),
        f("notes", Str).null(),
        f("created_at", Date).null(),
        f("updated_at", Date).null(),
    ]);
    out.push(coll(
        PORTFOLIO_ALLOCATIONS,
        Trading,
        Other,
        alloc,
        vec![
            ix(&[("allocation_id", 1)]).unique(),
            ix(&[("status", 1), ("timestamp", -1)]),
        ],
    ));

    let mut runs = vec![
        f("run_id", Str).req(),
        f("timestamp", Date).null(),
        f("strategies_used", Arr).null(),
        f("strategies_used.[]", Str),
        f("correlation_matrix", Arr).null(),
        f("correlation_matrix.[]", Arr),
        f("correlation_matrix.[].[]", Num),
        f("covariance_matrix", Arr).null(),
        f("covariance_matrix.[]", Arr),
        f("covariance_matrix.[].[]", Num),
        f("constraints", Obj).null(),
    ];
    runs.extend(metrics(&[
        "constraints.max_leverage",
        "constraints.max_single_strategy",
        "constraints.risk_free_rate",
    ]));
    runs.extend([
        f("optimization_result", Obj).null(),
        f("optimization_result.success", Bool).null(),
        f("optimization_result.message", Str).null(),
        f("optimization_result.converged", Bool).null(),
        f("optimization_result.iterations", Num).null(),
        f("recommended_allocations", Obj).null(),
        f("recommended_allocations.*", Num),
        f("portfolio_metrics", Obj).null(),
    ]);
    runs.extend(metrics(&[
        "portfolio_metrics.expected_daily_return",
        "portfolio_metrics.expected_daily_volatility",
        "portfolio_metrics.expected_sharpe_daily",
        "portfolio_metrics.expected_sharpe_annual",
        "portfolio_metrics.total_allocation_pct",
        "portfolio_metrics.leverage_ratio",
    ]));
    runs.extend([
        f("execution_time_ms", Num).null(),
        f("created_at", Date).null(),
    ]);
    out.push(coll(
        PORTFOLIO_OPTIMIZATION_RUNS,
        Trading,
        Other,
        runs,
        vec![ix(&[("run_id", 1)]).unique(), ix(&[("timestamp", -1)])],
    ));

    out.push(coll(
        STRATEGY_CONFIGURATIONS,
        Trading,
        Other,
        vec![
            f("strategy_id", Str).req(),
            f("strategy_name", Str).null(),
            f("status", Str).enums(STRATEGY_STATUS),
            f("trading_mode", Str).enums(TRADING_MODE),
            f("account", Str).null(),
            f("include_in_optimization", Bool),
            f("risk_limits", Obj).null(),
            f("risk_limits.max_position_size", Num).null(),
            f("risk_limits.max_daily_loss", Num).null(),
            f("developer_contact", Str).null(),
            f("notes", Str).null(),
            f("last_backtest_sync", Date).null(),
            f("created_at", Date).null(),
            f("updated_at", Date).null(),
        ],
        vec![ix(&[("strategy_id", 1)]).unique(), ix(&[("status", 1)])],
    ));

    // ------------------------------------------------------ mtx audit trail
    out.push(coll(
        ORDER_EVENTS,
        Trading,
        Sink,
        vec![
            f("order_id", Str).req(),
            f("seq", Int).req(),
            f("account", Str).req(),
            f("status", Str).req().enums(ORDER_STATUS),
            f("previous_status", Str).enums(ORDER_STATUS).null(),
            f("filled_quantity", Dec).req(),
            f("avg_fill_price", Dec).null(),
            f("reason", Str).null(),
            f("timestamp", Date).req(),
            f("created_at", Date).req(),
        ],
        vec![
            ix(&[("order_id", 1), ("seq", 1)]).unique(),
            ix(&[("timestamp", -1)]),
        ],
    ));
    out.push(coll(
        ORDER_CANCELS,
        Trading,
        Sink,
        vec![
            f("cancel_id", Str).req(),
            f("order_id", Str).req(),
            f("account", Str).req(),
            f("reason", Str).null(),
            f("timestamp", Date).req(),
            f("created_at", Date).req(),
        ],
        vec![ix(&[("cancel_id", 1)]).unique(), ix(&[("order_id", 1)])],
    ));
    out.push(coll(
        DEAD_LETTERS,
        Trading,
        Sink,
        vec![
            f("dead_letter_id", Str).req(),
            f("stage", Str).req(),
            f("reason", Str).req(),
            f("detail", Str),
            f("payload", Any),
            f("payload_encoding", Str).enums(&["utf8", "binary"]),
            f("time", Date).req(),
            f("original_subject", Str).null(),
            f("original_stream", Str).null(),
            f("original_seq", Int).null(),
            f("deliveries", Int).null(),
            f("headers", Obj),
            f("signal_id", Str).null(),
            f("raw_signal_id", Str).null(),
            f("dlq_subject", Str),
            f("created_at", Date).req(),
            f("redrives", Arr),
            f("redrives.[]", Obj),
            f("redrives.[].at", Date),
        ],
        vec![
            ix(&[("dead_letter_id", 1)]).unique(),
            ix(&[("stage", 1), ("time", -1)]),
            ix(&[("signal_id", 1)]).sparse(),
            ix(&[("raw_signal_id", 1)]).sparse(),
            ix(&[("time", -1)]),
        ],
    ));

    // ---------------------------------------------------------------- seed 001
    out.push(coll(
        "users",
        BotCore,
        Other,
        vec![
            f("email", Str).req().pattern(r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
            f("password_hash", Str).req().min_len(60),
            f("full_name", Str).null(),
            f("is_active", Bool).req(),
            f("is_admin", Bool).req(),
            f("created_at", Date).req(),
            f("updated_at", Date).req(),
            f("last_login", Date).null(),
            f("settings", Obj).req(),
            f("settings.trading_enabled", Bool),
            f("settings.risk_level", Str).enums(&["Low", "Medium", "High"]),
            f("settings.max_positions", Num).min(1.0).max(10.0),
            f("settings.default_quantity", Num).gt(0.0),
            f("settings.notifications", Obj),
            f("settings.notifications.email_alerts", Bool),
            f("settings.notifications.trade_notifications", Bool),
            f("settings.notifications.system_alerts", Bool),
        ],
        vec![
            ix(&[("email", 1)]).unique(),
            ix(&[("created_at", -1)]),
            ix(&[("is_active", 1)]),
        ],
    ));

    out.push(coll(
        "trades",
        BotCore,
        Other,
        vec![
            f("user_id", Oid).req(),
            f("symbol", Str).req(),
            f("side", Str).req().enums(SIDE),
            f("order_type", Str)
                .req()
                .enums(&["MARKET", "LIMIT", "STOP_LOSS", "TAKE_PROFIT"]),
            f("quantity", Dec).req().gt(0.0),
            f("price", Dec).null(),
            f("executed_price", Dec).null(),
            f("status", Str).req().enums(&[
                "PENDING",
                "FILLED",
                "PARTIALLY_FILLED",
                "CANCELLED",
                "FAILED",
            ]),
            f("binance_order_id", Str).null(),
            f("client_order_id", Str).req(),
            f("time_in_force", Str).req().enums(&["GTC", "IOC", "FOK"]),
            f("pnl", Dec).null(),
            f("pnl_percentage", Num).null().min(-100.0),
            f("fees", Dec).req().min(0.0),
            f("fee_asset", Str).req(),
            f("strategy_name", Str).null(),
            f("ai_signal_id", Str).null(),
            f("ai_confidence", Num).null(),
            f("created_at", Date).req(),
            f("updated_at", Date).req(),
            f("executed_at", Date).null(),
            f("cancelled_at", Date).null(),
            f("metadata", Obj).req(),
            f("metadata.ip_address", Str),
            f("metadata.user_agent", Str),
            f("metadata.notes", Str).null(),
        ],
        vec![
            ix(&[("user_id", 1), ("created_at", -1)]),
            ix(&[("symbol", 1), ("created_at", -1)]),
            ix(&[("status", 1)]),
            ix(&[("binance_order_id", 1)]).sparse(),
            ix(&[("ai_signal_id", 1)]).sparse(),
            ix(&[("created_at", 1)]).ttl(31_536_000),
        ],
    ));

    out.push(coll(
        "positions",
        BotCore,
        Other,
        vec![
            f("user_id", Oid).req(),
            f("symbol", Str).req(),
            f("side", Str).req().enums(DIRECTION),
            f("entry_price", Dec).req(),
            f("current_price", Dec).req(),
            f("quantity", Dec).req().gt(0.0),
            f("leverage", Num).req().min(1.0).max(125.0),
            f("stop_loss", Dec).null(),
            f("take_profit", Dec).null(),
            f("liquidation_price", Dec).null(),
            f("unrealized_pnl", Dec).req(),
            f("realized_pnl", Dec).req(),
            f("total_pnl", Dec).req(),
            f("pnl_percentage", Num).req(),
            f("margin_type", Str).req().enums(&["cross", "isolated"]),
            f("margin_used", Dec).req(),
            f("maintenance_margin", Dec).req(),
            f("margin_ratio", Num).req(),
            f("total_fees", Dec).req(),
            f("funding_fees", Dec).req(),
            f("strategy_name", Str).null(),
            f("ai_signal_id", Str).null(),
            f("opened_at", Date).req(),
            f("updated_at", Date).req(),
            f("last_price_update", Date).req(),
            f("metadata", Obj).req(),
            f("metadata.max_favorable_excursion", Dec),
            f("metadata.max_adverse_excursion", Dec),
            f("metadata.entry_volatility", Num),
            f("metadata.risk_score", Num).min(0.0).max(1.0),
        ],
        vec![
            ix(&[("user_id", 1), ("symbol", 1)]),
            ix(&[("symbol", 1), ("opened_at", -1)]),
            ix(&[("margin_ratio", 1)]),
            ix(&[("updated_at", -1)]),
        ],
    ));
    if let Some(p) = out.last_mut() {
        p.unenforced_rules = &[
            "positions.margin_ratio: alerts below 1.5 (monitoring, not validation)",
            "positions.liquidation_price: must be calculated for leveraged positions (writer's rule)",
        ];
    }

    let mut md = coll(
        MARKET_DATA,
        BotCore,
        Other,
        vec![
            f("symbol", Str).req(),
            f("timeframe", Str)
                .req()
                .enums(&["1m", "5m", "15m", "1h", "4h", "1d"]),
            f("open_time", Date).req(),
            f("close_time", Date).req(),
            f("open_price", Dec).req(),
            f("high_price", Dec).req(),
            f("low_price", Dec).req(),
            f("close_price", Dec).req(),
            f("volume", Dec).req().min(0.0),
            f("quote_volume", Dec).req().min(0.0),
            f("trades_count", Num),
            f("taker_buy_base_volume", Dec),
            f("taker_buy_quote_volume", Dec),
            f("indicators", Obj),
            f("indicators.rsi_14", Num).null(),
            f("indicators.macd", Num).null(),
            f("indicators.macd_signal", Num).null(),
            f("indicators.bollinger_upper", Dec).null(),
            f("indicators.bollinger_middle", Dec).null(),
            f("indicators.bollinger_lower", Dec).null(),
            f("indicators.ema_20", Dec).null(),
            f("indicators.sma_50", Dec).null(),
            f("created_at", Date),
            f("source", Str).enums(&["binance", "manual", "backfill"]),
        ],
        vec![
            ix(&[("symbol", 1), ("timeframe", 1), ("open_time", -1)]),
            ix(&[("symbol", 1), ("timeframe", 1), ("close_time", -1)]),
            // The seed's TTL index on open_time is the collection-level
            // expireAfterSeconds of the time series (see TimeSeries).
        ],
    );
    md.timeseries = Some(TimeSeries {
        time_field: "open_time",
        meta_field: "symbol",
        granularity: "minutes",
        expire_after_seconds: 7_776_000,
    });
    md.unenforced_rules = &[
        "market_data: time-series collections take no validator; high_price >= low_price, high_price >= open/close, low_price <= open/close and non-negative volumes are the writer's checks",
        "market_data: the seed's TTL index { open_time: 1 } expireAfterSeconds 7776000 is the time series' collection-level expireAfterSeconds",
    ];
    out.push(md);

    out.push(coll(
        "ai_analysis_results",
        BotCore,
        Other,
        vec![
            f("analysis_id", Str).req(),
            f("symbol", Str).req(),
            f("timeframe", Str).req(),
            f("signal", Str)
                .req()
                .enums(&["BUY", "SELL", "HOLD", "NEUTRAL"]),
            f("signal_strength", Str)
                .req()
                .enums(&["STRONG", "MODERATE", "WEAK"]),
            f("confidence", Num).req().min(0.0).max(1.0),
            f("reasoning", Str).req(),
            f("entry_price", Dec).null(),
            f("stop_loss", Dec).null(),
            f("take_profit", Dec).null(),
            f("position_size", Num).null().min(0.0).max(100.0),
            f("risk_reward_ratio", Num).null().gt(0.0),
            f("market_analysis", Obj),
            f("market_analysis.trend_direction", Str).enums(&["BULLISH", "BEARISH", "SIDEWAYS"]),
            f("market_analysis.trend_strength", Num).min(0.0).max(100.0),
            f("market_analysis.volatility", Num).min(0.0).max(100.0),
            f("market_analysis.volume_trend", Str).enums(&["INCREASING", "DECREASING", "STABLE"]),
            f("market_analysis.support_levels", Arr),
            f("market_analysis.support_levels.[]", Dec),
            f("market_analysis.resistance_levels", Arr),
            f("market_analysis.resistance_levels.[]", Dec),
            f("market_analysis.risk_score", Num).min(0.0).max(100.0),
            f("indicators", Obj),
            f("indicators.rsi", Num).null(),
            f("indicators.macd", Num).null(),
            f("indicators.adx", Num).null(),
            f("indicators.bollinger_position", Num).null(),
            f("indicators.volume_ratio", Num).null(),
            f("indicators.moving_averages", Obj),
            f("indicators.moving_averages.sma_20", Dec).null(),
            f("indicators.moving_averages.ema_50", Dec).null(),
            f("indicators.moving_averages.ema_200", Dec).null(),
            f("model_metadata", Obj),
            f("model_metadata.model_name", Str),
            f("model_metadata.model_version", Str),
            f("model_metadata.processing_time_ms", Num),
            f("model_metadata.tokens_used", Num).null(),
            f("model_metadata.temperature", Num).null(),
            f("timestamp", Date).req(),
            f("created_at", Date).req(),
            f("expires_at", Date).null(),
            f("executed", Bool).req(),
            f("trade_id", Str).null(),
            f("performance", Obj),
            f("performance.outcome", Str)
                .enums(&["WIN", "LOSS", "BREAKEVEN"])
                .null(),
            f("performance.actual_pnl", Dec).null(),
            f("performance.signal_accuracy", Num).null(),
        ],
        vec![
            ix(&[("symbol", 1), ("timestamp", -1)]),
            ix(&[("signal", 1), ("confidence", -1)]),
            ix(&[("executed", 1)]),
            ix(&[("trade_id", 1)]).sparse(),
            ix(&[("created_at", 1)]).ttl(2_592_000),
        ],
    ));

    out.push(coll(
        "portfolio_snapshots",
        BotCore,
        Other,
        vec![
            f("user_id", Oid).req(),
            f("total_value", Dec).req(),
            f("cash_balance", Dec).req(),
            f("positions_value", Dec).req(),
            f("margin_used", Dec).req(),
            f("free_margin", Dec).req(),
            f("unrealized_pnl", Dec).req(),
            f("realized_pnl", Dec).req(),
            f("daily_pnl", Dec).req(),
            f("total_pnl", Dec).req(),
            f("total_pnl_percentage", Num).req(),
            f("open_positions_count", Num).req(),
            f("long_positions_count", Num).req(),
            f("short_positions_count", Num).req(),
            f("portfolio_leverage", Num).req(),
            f("max_drawdown", Dec).req(),
            f("max_drawdown_percentage", Num).req(),
            f("var_95", Dec).null(),
            f("sharpe_ratio", Num).null(),
            f("snapshot_time", Date).req(),
            f("created_at", Date).req(),
        ],
        vec![
            ix(&[("user_id", 1), ("snapshot_time", -1)]),
            ix(&[("snapshot_time", -1)]),
            ix(&[("created_at", 1)]).ttl(7_776_000),
        ],
    ));

    let mut pta = vec![
        f("user_id", Oid).req(),
        f("initial_balance", Dec).req(),
        f("current_balance", Dec).req(),
        f("equity", Dec).req(),
        f("margin_used", Dec).req(),
        f("free_margin", Dec).req(),
        f("metrics", Obj).req(),
    ];
    pta.extend(
        [
            "metrics.total_trades",
            "metrics.winning_trades",
            "metrics.losing_trades",
            "metrics.total_pnl_percentage",
            "metrics.profit_factor",
            "metrics.sharpe_ratio",
            "metrics.max_drawdown_percentage",
            "metrics.max_consecutive_wins",
            "metrics.max_consecutive_losses",
            "metrics.average_trade_duration_ms",
            "metrics.shortest_trade_ms",
            "metrics.longest_trade_ms",
        ]
        .iter()
        .map(|p| f(p, Num)),
    );
    pta.push(f("metrics.win_rate", Num).min(0.0).max(100.0));
    pta.extend(
        [
            "metrics.total_pnl",
            "metrics.average_win",
            "metrics.average_loss",
            "metrics.largest_win",
            "metrics.largest_loss",
            "metrics.max_drawdown",
        ]
        .iter()
        .map(|p| f(p, Dec)),
    );
    pta.extend([
        f("open_positions", Num).req(),
        f("open_trade_ids", Arr).req(),
        f("open_trade_ids.[]", Str),
        f("settings", Obj).req(),
        f("settings.max_leverage", Num),
        f("settings.max_positions", Num),
        f("settings.default_quantity", Dec),
        f("settings.trading_fees_rate", Num),
        f("settings.enable_ai_trading", Bool),
        f("settings.risk_per_trade", Num),
        f("created_at", Date).req(),
        f("updated_at", Date).req(),
        f("last_trade_at", Date).null(),
        f("reset_at", Date).null(),
    ]);
    out.push(coll(
        "paper_trading_accounts",
        BotCore,
        Other,
        pta,
        vec![
            ix(&[("user_id", 1)]).unique(),
            ix(&[("metrics.total_pnl", -1)]),
            ix(&[("metrics.win_rate", -1)]),
        ],
    ));

    out.push(coll(
        "paper_trading_trades",
        BotCore,
        Other,
        vec![
            f("trade_id", Str).req(),
            f("user_id", Oid).req(),
            f("account_id", Oid).req(),
            f("symbol", Str).req(),
            f("trade_type", Str).req().enums(DIRECTION),
            f("status", Str)
                .req()
                .enums(&["OPEN", "CLOSED", "CANCELLED"]),
            f("entry_price", Dec).req(),
            f("quantity", Dec).req(),
            f("leverage", Num).req().min(1.0).max(125.0),
            f("initial_margin", Dec).req(),
            f("exit_price", Dec).null(),
            f("close_reason", Str)
                .enums(&[
                    "TAKE_PROFIT",
                    "STOP_LOSS",
                    "MANUAL",
                    "AI_SIGNAL",
                    "MARGIN_CALL",
                ])
                .null(),
            f("pnl", Dec).null(),
            f("pnl_percentage", Num).req(),
            f("unrealized_pnl", Dec).req(),
            f("trading_fees", Dec).req(),
            f("funding_fees", Dec).req(),
            f("total_fees", Dec).req(),
            f("stop_loss", Dec).null(),
            f("take_profit", Dec).null(),
            f("max_favorable_excursion", Dec).req(),
            f("max_adverse_excursion", Dec).req(),
            f("ai_signal_id", Str).null(),
            f("ai_confidence", Num).null(),
            f("ai_reasoning", Str).null(),
            f("open_time", Date).req(),
            f("close_time", Date).null(),
            f("duration_ms", Num).null(),
            f("created_at", Date).req(),
            f("updated_at", Date).req(),
        ],
        vec![
            ix(&[("trade_id", 1)]).unique(),
            ix(&[("user_id", 1), ("created_at", -1)]),
            ix(&[("account_id", 1), ("status", 1)]),
            ix(&[("symbol", 1), ("created_at", -1)]),
            ix(&[("status", 1)]),
            ix(&[("ai_signal_id", 1)]).sparse(),
        ],
    ));

    out.push(coll(
        AUDIT_LOGS,
        BotCore,
        Other,
        vec![
            f("user_id", Oid).null(),
            f("action", Str).req(),
            f("resource", Str).req(),
            f("resource_id", Str).null(),
            f("method", Str).null(),
            f("endpoint", Str).null(),
            f("ip_address", Str).req(),
            f("user_agent", Str).null(),
            f("status", Str)
                .req()
                .enums(&["SUCCESS", "FAILURE", "ERROR"]),
            f("error_message", Str).null(),
            f("metadata", Obj),
            f("timestamp", Date).req(),
            f("created_at", Date).req(),
            // mtx: natural key of entries written by the sink.
            f("audit_id", Str),
        ],
        vec![
            ix(&[("user_id", 1), ("timestamp", -1)]),
            ix(&[("action", 1), ("timestamp", -1)]),
            ix(&[("resource", 1), ("resource_id", 1)]),
            ix(&[("ip_address", 1)]),
            ix(&[("timestamp", -1)]),
            ix(&[("created_at", 1)]).ttl(15_552_000),
            ix(&[("audit_id", 1)]).unique().sparse(),
        ],
    ));

    out.push(coll(
        SYSTEM_CONFIG,
        BotCore,
        Other,
        vec![
            f("key", Str).req(),
            f("value", Any).req(),
            f("category", Str).req(),
            f("description", Str).req(),
            f("is_active", Bool).req(),
            f("updated_by", Str).req(),
            f("updated_at", Date).req(),
            f("created_at", Date).req(),
        ],
        vec![ix(&[("key", 1)]).unique(), ix(&[("category", 1)])],
    ));

    // The brief collections: documented by name only (no fields); notifications
    // carry the retention table's 7-day TTL on their creation time.
    for name in [
        "paper_trading_settings",
        "portfolio_history",
        "ai_signals",
        "performance_metrics",
        "sessions",
        "api_keys",
    ] {
        out.push(coll(name, BotCore, Other, vec![], vec![]));
    }
    out.push(coll(
        "notifications",
        BotCore,
        Other,
        vec![],
        vec![ix(&[("created_at", 1)]).ttl(604_800)],
    ));
    if let Some(n) = out.last_mut() {
        n.unenforced_rules = &[
            "notifications: the 7-day TTL is placed on created_at (the seed names the retention, not the field)",
        ];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_collection_is_there() {
        for name in [
            "raw_signals",
            "standardized_signals",
            "trading_orders",
            "execution_confirmations",
            "account_state",
            "cerebro_decisions",
            "strategy_backtest_data",
            "portfolio_allocations",
            "portfolio_optimization_runs",
            "strategy_configurations",
            "users",
            "trades",
            "positions",
            "market_data",
            "ai_analysis_results",
            "portfolio_snapshots",
            "paper_trading_accounts",
            "paper_trading_trades",
            "paper_trading_settings",
            "portfolio_history",
            "ai_signals",
            "performance_metrics",
            "audit_logs",
            "sessions",
            "notifications",
            "system_config",
            "api_keys",
            "dead_letters",
        ] {
            assert!(spec(name).is_some(), "{name} missing");
        }
        let names: Vec<_> = catalog().iter().map(|c| (c.db, c.name)).collect();
        let mut dedup = names.clone();
        dedup.sort_by_key(|(_, n)| *n);
        dedup.dedup();
        assert_eq!(names.len(), dedup.len());
    }

    #[test]
    fn seed_indexes_are_exact() {
        let t = spec("trades").unwrap();
        let ttl = t.indexes.iter().find(|i| i.ttl.is_some()).unwrap();
        assert_eq!(ttl.name(), "created_at_1");
        assert_eq!(ttl.ttl, Some(31_536_000));
        let u = spec("users").unwrap();
        assert!(u.indexes[0].unique && u.indexes[0].name() == "email_1");
        let md = spec("market_data").unwrap();
        assert_eq!(md.indexes[0].name(), "symbol_1_timeframe_1_open_time_-1");
        assert_eq!(
            md.timeseries.as_ref().unwrap().expire_after_seconds,
            7_776_000
        );
        assert!(md.validator().is_none());
    }

    #[test]
    fn validator_nests_and_requires() {
        let v = spec("account_state").unwrap().validator().unwrap();
        let s = v.get_document("$jsonSchema").unwrap();
        let req = s.get_array("required").unwrap();
        assert!(req.contains(&Bson::from("equity")));
        let props = s.get_document("properties").unwrap();
        assert_eq!(
            props
                .get_document("equity")
                .unwrap()
                .get_str("bsonType")
                .ok(),
            Some("decimal")
        );
        let items = props
            .get_document("open_positions")
            .unwrap()
            .get_document("items")
            .unwrap();
        assert_eq!(
            items
                .get_document("properties")
                .unwrap()
                .get_document("entry_price")
                .unwrap()
                .get_str("bsonType")
                .ok(),
            Some("decimal")
        );
        let dc = props.get_document("deployed_capital").unwrap();
        assert!(dc.get_document("additionalProperties").is_ok());
        let users = spec("users").unwrap().validator().unwrap();
        let mp = users
            .get_document("$jsonSchema")
            .unwrap()
            .get_document("properties")
            .unwrap()
            .get_document("settings")
            .unwrap()
            .get_document("properties")
            .unwrap()
            .get_document("max_positions")
            .unwrap()
            .clone();
        assert_eq!(mp.get_f64("minimum").ok(), Some(1.0));
        assert_eq!(mp.get_f64("maximum").ok(), Some(10.0));
    }

    #[test]
    fn nullable_enum_includes_null() {
        let v = spec("standardized_signals").unwrap().validator().unwrap();
        let action = v
            .get_document("$jsonSchema")
            .unwrap()
            .get_document("properties")
            .unwrap()
            .get_document("action")
            .unwrap()
            .clone();
        assert!(action.get_array("enum").unwrap().contains(&Bson::Null));
    }
}
