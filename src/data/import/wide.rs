//! The *wide* layout: one row per user; the config's `steps` name, for each time step
//! (oldest first), the column of every event field and whether the step is pre- or
//! in-service. Each step is one event of the user's sequence of that phase.

use std::collections::HashMap;

use super::config::{ImportConfig, Phase};
use super::{At, Col, Csv, Table, UserColumns};
use crate::Result;

/// The resolved columns of one step, event fields in schema order (categorical, numeric).
struct StepColumns {
    phase: Phase,
    cat: Vec<Col>,
    num: Vec<Col>,
}

/// Reads and checks the users file into a [`Table`].
pub(crate) fn parse(config: &ImportConfig) -> Result<Table> {
    let mut users = Csv::open(&config.users.file)?;
    let unit = config.users.time_form().unit();
    let cols = UserColumns::resolve(config, &users, unit)?;
    let mut steps = Vec::with_capacity(config.steps.len());
    for (k, step) in config.steps.iter().enumerate() {
        let resolve = |field: String| -> Result<Col> {
            let key = format!("steps[{k}].columns.{field}");
            let name = step
                .columns
                .get(&field)
                .ok_or_else(|| config.error(&key, "missing"))?;
            users.column(config, &key, name)
        };
        steps.push(StepColumns {
            phase: step.phase,
            cat: config
                .event_cat
                .iter()
                .map(|f| resolve(f.field_name()))
                .collect::<Result<_>>()?,
            num: config
                .event_num
                .iter()
                .map(|f| resolve(f.field_name()))
                .collect::<Result<_>>()?,
        });
    }
    let mut table = Table::new(config, &config.users.file, &cols, unit);
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut rec = csv::StringRecord::new();
    while let Some(line) = users.next(&mut rec)? {
        let at = At {
            file: &config.users.file,
            line,
        };
        table.push_user(config, &cols, at, &rec, &mut ids)?;
        let (mut n_pre, mut n_in) = (0, 0);
        for step in &steps {
            if config.skip_empty_steps
                && step
                    .cat
                    .iter()
                    .chain(&step.num)
                    .all(|c| rec.get(c.index).is_some_and(str::is_empty))
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
                seq.cat.push(at.category(&rec, col, cfg, interner)?);
            }
            for (col, cfg) in step.num.iter().zip(&config.event_num) {
                seq.num.push(at.number(&rec, col, cfg)?);
            }
            *n += 1;
        }
        table.pre.close_row(n_pre);
        table.inn.close_row(n_in);
    }
    Ok(table)
}
