//! The *wide* layout: one row per user; the config's `steps` name, for each time step
//! (oldest first), the column of every event field and whether the step is pre- or
//! in-service. Each step is one event of the user's sequence of that phase.

use std::collections::HashMap;

use super::config::{ImportConfig, Phase};
use super::source::{Cell, Role, Source};
use super::{At, Col, Table, UserColumns};
use crate::Result;

/// The resolved columns of one step, event fields in schema order (categorical, numeric).
struct StepColumns {
    phase: Phase,
    cat: Vec<Col>,
    num: Vec<Col>,
}

/// Reads and checks the users file into a [`Table`].
pub(crate) fn parse(config: &mut ImportConfig) -> Result<Table> {
    let mut users = Source::open(&config.users.file)?;
    let form = config.users.time_form();
    let unit = users.time_unit(config.users.time.as_deref().unwrap_or_default(), &form);
    let cols = UserColumns::resolve(config, &mut users, unit)?;
    let mut steps = Vec::with_capacity(config.steps.len());
    for (k, step) in config.steps.iter().enumerate() {
        let mut resolve = |field: String, role: Role| -> Result<Col> {
            let key = format!("steps[{k}].columns.{field}");
            let name = step
                .columns
                .get(&field)
                .ok_or_else(|| config.error(&key, "missing"))?;
            users.column(config, &key, name, role)
        };
        let mut cat = Vec::new();
        for f in &config.event_cat {
            cat.push(resolve(f.field_name(), Role::Text)?);
        }
        let mut num = Vec::new();
        for f in &config.event_num {
            num.push(resolve(f.field_name(), Role::Number)?);
        }
        steps.push(StepColumns {
            phase: step.phase,
            cat,
            num,
        });
    }
    // No event times: only the activation month can be derived.
    config.add_derived(None)?;
    let config = &*config;
    let mut table = Table::new(config, &users, &cols, unit);
    let mut ids: HashMap<String, usize> = HashMap::new();
    while let Some(line) = users.next()? {
        let at = At::of(&users, line);
        table.push_user(config, &cols, at, &users, &mut ids)?;
        let (mut n_pre, mut n_in) = (0, 0);
        for step in &steps {
            if config.skip_empty_steps
                && step
                    .cat
                    .iter()
                    .chain(&step.num)
                    .all(|c| matches!(users.cell(c), Ok(Cell::Empty)))
            {
                continue;
            }
            let (seq, n) = match step.phase {
                Phase::Pre => (&mut table.pre, &mut n_pre),
                Phase::In => (&mut table.inn, &mut n_in),
            };
            for ((col, cfg), interner) in step
                .cat
                .iter()
                .zip(&config.event_cat)
                .zip(&mut table.event_interners)
            {
                seq.cat.push(at.category(&users, col, cfg, interner)?);
            }
            for (col, cfg) in step.num.iter().zip(&config.event_num) {
                seq.num.push(at.number(&users, col, cfg)?);
            }
            *n += 1;
        }
        table.pre.close_row(n_pre);
        table.inn.close_row(n_in);
    }
    Ok(table)
}
