//! The *long* layout: a users file (one row per user: id, activation time, label, profile)
//! and an events file (one row per event: user id, time, event fields), in any order.
//!
//! Events of a user are sorted by time (stable: equal times keep their file order). An event
//! with `time < activation` is pre-service; one with `activation <= time` (and, when the
//! config sets `events.window`, `time < activation + window`) is in-service; later events
//! are dropped and counted.

use std::collections::HashMap;

use super::config::{Derived, ImportConfig};
use super::source::{Role, Source};
use super::times::{TimeReader, Unit};
use super::{
    calendar_cell, median_abs, signed_log1p, window_span, At, Col, EventSpans, Table, UserColumns,
    TOO_FAR_DAYS,
};
use crate::{Error, Result};

/// Reads and checks both files into a [`Table`].
pub(crate) fn parse(config: &mut ImportConfig) -> Result<Table> {
    let events_cfg = config
        .events
        .clone()
        .ok_or_else(|| config.error("events", "missing: the long layout needs an events file"))?;
    let mut users = Source::open(&config.users.file)?;
    let mut events = Source::open(&events_cfg.file)?;
    let events_form = events_cfg.time_form();
    let users_form = config.users.time_form();
    let unit = Unit::common(&[
        users.time_unit(
            config.users.time.as_deref().unwrap_or_default(),
            &users_form,
        ),
        events.time_unit(&events_cfg.time, &events_form),
    ]);
    let cols = UserColumns::resolve(config, &mut users, unit)?;
    let id_col = events.column(config, "events.id", &events_cfg.id, Role::Text)?;
    let time_col = events.column(
        config,
        "events.time",
        &events_cfg.time,
        Role::Time(events_form.clone()),
    )?;
    let mut cat_cols: Vec<Col> = Vec::new();
    for (i, f) in config.event_cat.iter().enumerate() {
        let key = format!("event_cat[{i}].column");
        let name = f.column.as_deref().unwrap_or_default();
        cat_cols.push(events.column(config, &key, name, Role::Text)?);
    }
    let mut num_cols: Vec<Col> = Vec::new();
    for (i, f) in config.event_num.iter().enumerate() {
        let key = format!("event_num[{i}].column");
        let name = f.column.as_deref().unwrap_or_default();
        num_cols.push(events.column(config, &key, name, Role::Number)?);
    }
    let (ec, ed) = (cat_cols.len(), num_cols.len());
    let time_of_day = events.time_of_day(&events_cfg.time, &events_form);
    let time_reader = TimeReader::new(events_form, config.time_zone()?, unit);
    // The derived fields follow the configured ones: events carry `ec` categorical cells
    // read from columns, then the derived ones, and likewise `ed` numbers.
    config.add_derived(Some(time_of_day))?;
    let config = &*config;
    let derived_cat: Vec<Derived> = config.event_cat[ec..]
        .iter()
        .filter_map(|c| c.derived)
        .collect();
    let derived_num: Vec<Derived> = config.event_num[ed..]
        .iter()
        .filter_map(|c| c.derived)
        .collect();
    let ec_all = config.event_cat.len();

    let mut table = Table::new(config, &users, &cols, unit);
    let mut ids: HashMap<String, usize> = HashMap::new();
    while let Some(line) = users.next()? {
        let at = At::of(&users, line);
        table.push_user(config, &cols, at, &users, &mut ids)?;
    }
    let activation = table
        .times
        .clone()
        .ok_or_else(|| config.error("users.time", "missing: the long layout needs it"))?;

    // All events, in file order.
    let mut ev_user: Vec<usize> = Vec::new();
    let mut ev_time: Vec<f64> = Vec::new();
    let mut ev_cat: Vec<u32> = Vec::new();
    let mut ev_num: Vec<f64> = Vec::new();
    while let Some(line) = events.next()? {
        let at = At::of(&events, line);
        let id = at.text(&events, &id_col)?;
        let user = *ids.get(id.as_ref()).ok_or_else(|| {
            at.err(
                &id_col,
                format!(
                    "user id {id:?} is not in the users file {}",
                    config.users.file.display()
                ),
            )
        })?;
        ev_user.push(user);
        let time = at.time(&events, &time_col, &time_reader)?;
        ev_time.push(time.value);
        for ((col, cfg), interner) in cat_cols
            .iter()
            .zip(&config.event_cat)
            .zip(&mut table.event_interners)
        {
            ev_cat.push(at.category(&events, col, cfg, interner)?);
        }
        for (d, interner) in derived_cat.iter().zip(&mut table.event_interners[ec..]) {
            ev_cat.push(calendar_cell(*d, time.civil, interner));
        }
        for (col, cfg) in num_cols.iter().zip(&config.event_num) {
            ev_num.push(at.number(&events, col, cfg)?);
        }
    }

    // Group by user, time order within a user; the sort is stable, so ties keep file order.
    let mut order: Vec<usize> = (0..ev_user.len()).collect();
    order.sort_by(|&a, &b| {
        ev_user[a].cmp(&ev_user[b]).then_with(|| {
            ev_time[a]
                .partial_cmp(&ev_time[b])
                .unwrap_or(std::cmp::Ordering::Equal)
        })
    });
    let window = match &events_cfg.window {
        Some(w) => {
            let (x, from) = config.window(w)?;
            Some(unit.convert(x, from))
        }
        None => None,
    };
    let mut next = 0;
    for (user, &act) in activation.iter().enumerate() {
        let (mut n_pre, mut n_in) = (0, 0);
        let start = next;
        while next < order.len() && ev_user[order[next]] == user {
            next += 1;
        }
        // Pre-service events come first in time order, so one pass fills both sequences.
        let mut previous: Option<f64> = None;
        for &e in &order[start..next] {
            let t = ev_time[e];
            let (seq, n) = if t < act {
                (&mut table.pre, &mut n_pre)
            } else if window.is_none_or(|w| t < act + w) {
                (&mut table.inn, &mut n_in)
            } else {
                table.dropped_events += 1;
                continue;
            };
            seq.cat
                .extend_from_slice(&ev_cat[e * ec_all..(e + 1) * ec_all]);
            seq.num.extend_from_slice(&ev_num[e * ed..(e + 1) * ed]);
            for d in &derived_num {
                let seconds = match d {
                    Derived::SincePrevious => previous.map_or(0.0, |p| t - p),
                    _ => (t - act).abs(),
                } * unit.seconds();
                seq.num.push(signed_log1p(seconds));
            }
            previous = Some(t);
            *n += 1;
        }
        table.pre.close_row(n_pre);
        table.inn.close_row(n_in);
    }
    if next != order.len() {
        return Err(Error::invalid(
            "internal: events left after grouping by user",
        ));
    }
    drop((order, ev_cat, ev_num));

    // The events' distances from their user's activation, in days, in place of their times
    // (no longer needed): each window's span, and the check for a unit mistake.
    let day = unit.seconds() / 86_400.0;
    for (t, &u) in ev_time.iter_mut().zip(&ev_user) {
        *t = (*t - activation[u]) * day;
    }
    let window_days = window.map(|w| w * day);
    ev_time.sort_unstable_by(f64::total_cmp);
    let pre_end = ev_time.partition_point(|&d| d < 0.0);
    let in_end = window_days.map_or(ev_time.len(), |w| ev_time.partition_point(|&d| d < w));
    let mut before: Vec<f64> = Vec::new();
    before.extend(ev_time[..pre_end].iter().rev().map(|d| -d));
    table.event_spans = Some(EventSpans {
        window_days,
        pre: window_span(&before),
        inn: window_span(&ev_time[pre_end..in_end]),
    });
    drop(before);
    if let Some(median) = median_abs(&mut ev_time) {
        if median > TOO_FAR_DAYS {
            table.warnings.push(format!(
                "{}: column `{}`: the median distance between an event and its user's \
                 activation (column `{}` of {}) is {median:.0} days ({:.0} years): are the \
                 time forms right? (e.g. milliseconds read as seconds, or plain numbers that \
                 are not days: set time_form; docs/import.md, \"Times\")",
                events_cfg.file.display(),
                events_cfg.time,
                config.users.time.as_deref().unwrap_or_default(),
                config.users.file.display(),
                median / 365.25,
            ));
        }
    }
    Ok(table)
}
