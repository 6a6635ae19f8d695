//! Building blocks for the filters: a syscall allowed outright or only with some argument
//! values, merged into one map per thread class.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::SeccompError;

/// Syscall number -> the rules that allow it (an empty list: allowed with any arguments).
pub type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// One syscall and what it may be called with.
#[derive(Clone, Debug)]
pub struct Allow {
    pub nr: libc::c_long,
    /// Each inner list is one rule: all its conditions must hold. No rules: any arguments.
    pub rules: Vec<Vec<Cond>>,
}

/// One argument condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond {
    pub arg: u8,
    pub op: Op,
    pub value: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    /// `arg & mask == value`.
    Masked(u64),
}

/// Allowed with any arguments.
pub fn any(nr: libc::c_long) -> Allow {
    Allow { nr, rules: Vec::new() }
}

/// Allowed when argument `arg` equals one of `values`.
pub fn arg_in(nr: libc::c_long, arg: u8, values: &[u64]) -> Allow {
    Allow { nr, rules: values.iter().map(|&value| vec![Cond { arg, op: Op::Eq, value }]).collect() }
}

/// Allowed when every rule's conditions hold for one of `rules`.
pub fn when(nr: libc::c_long, rules: Vec<Vec<Cond>>) -> Allow {
    Allow { nr, rules }
}

/// `arg == value`.
pub fn eq(arg: u8, value: u64) -> Cond {
    Cond { arg, op: Op::Eq, value }
}

/// `arg & mask == value`.
pub fn masked(arg: u8, mask: u64, value: u64) -> Cond {
    Cond { arg, op: Op::Masked(mask), value }
}

/// Adds `allows` to `map`: a syscall allowed outright stays so; otherwise the rules add up.
pub fn merge(map: &mut BTreeMap<libc::c_long, Option<Vec<Vec<Cond>>>>, allows: &[Allow]) {
    for allow in allows {
        let entry = map.entry(allow.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), allow.rules.is_empty()) {
            (None, _) => {}
            (Some(_), true) => *entry = None,
            (Some(rules), false) => {
                for rule in &allow.rules {
                    if !rules.contains(rule) {
                        rules.push(rule.clone());
                    }
                }
            }
        }
    }
}

/// The seccompiler form of a merged map.
pub fn to_rule_map(map: &BTreeMap<libc::c_long, Option<Vec<Vec<Cond>>>>) -> Result<RuleMap, SeccompError> {
    let mut out = RuleMap::new();
    for (&nr, rules) in map {
        let rules = match rules {
            None => Vec::new(),
            Some(rules) => rules.iter().map(|conds| to_rule(conds)).collect::<Result<Vec<_>, _>>()?,
        };
        out.insert(nr, rules);
    }
    Ok(out)
}

fn to_rule(conds: &[Cond]) -> Result<SeccompRule, SeccompError> {
    let conds = conds
        .iter()
        .map(|c| {
            let (op, widest) = match c.op {
                Op::Eq => (SeccompCmpOp::Eq, c.value),
                Op::Masked(mask) => (SeccompCmpOp::MaskedEq(mask), mask | c.value),
            };
            // The arguments checked here are C ints (fds, ioctl commands: the kernel takes
            // `unsigned int cmd`, flags, domains): their register's upper half is undefined,
            // so they compare as 32 bits.
            let len = if u32::try_from(widest).is_ok() { SeccompCmpArgLen::Dword } else { SeccompCmpArgLen::Qword };
            SeccompCondition::new(c.arg, len, op, c.value)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SeccompError::Compile)?;
    SeccompRule::new(conds).map_err(SeccompError::Compile)
}
