//! The built-in corpus: a deterministic generator of simple English children's stories.
//!
//! Written for this project (it is *not* TinyStories): a small grammar of characters, places,
//! objects, feelings and plots (a lost toy, learning to do something, sharing, helping an
//! animal, a change in the weather, a new friend, a surprise, a discovery), with dialogue and a
//! closing line. Story `i` of seed `s` is always the same text, so the corpus is reproducible
//! on every machine without a download. The space of stories is in the billions; any seed gives
//! tens of thousands of distinct ones.

use crate::util::rng::Rng;

struct Hero {
    name: &'static str,
    kind: &'static str,
    he: &'static str,
    his: &'static str,
    him: &'static str,
}

const GIRLS: &[&str] = &[
    "Lily", "Mia", "Sara", "Anna", "Lucy", "Emma", "Zoe", "Ella", "Ruby", "Daisy", "Molly", "Rosa",
    "Nina", "Bella", "Amy", "Kate", "Lola", "Ivy",
];
const BOYS: &[&str] = &[
    "Tom", "Ben", "Max", "Sam", "Jack", "Leo", "Finn", "Noah", "Oliver", "Jake", "Tim", "Kai",
    "Pip", "Ollie", "Sid", "Dan", "Luke", "Joe",
];
const GIRL_KINDS: &[&str] = &["little girl", "girl", "small girl"];
const BOY_KINDS: &[&str] = &["little boy", "boy", "small boy"];
const ANIMAL_KINDS: &[&str] = &[
    "small dog",
    "little cat",
    "tiny bird",
    "brave rabbit",
    "happy frog",
    "young bear",
    "curious mouse",
    "little duck",
    "fluffy sheep",
    "baby fox",
    "slow turtle",
    "little pig",
];
const TRAITS: &[&str] = &[
    "kind", "shy", "curious", "brave", "happy", "silly", "gentle", "busy",
];
const PLACES: &[&str] = &[
    "the park",
    "the forest",
    "the garden",
    "the beach",
    "the farm",
    "the big hill",
    "the river",
    "the playground",
    "the lake",
    "the meadow",
    "the woods",
    "the yard",
    "the pond",
    "the market",
];
const SPOTS: &[&str] = &[
    "under a big tree",
    "behind a rock",
    "in the tall grass",
    "next to the fence",
    "under a bush",
    "near the water",
    "inside an old log",
    "under a pile of leaves",
    "behind the swing",
];
const OBJECTS: &[&str] = &[
    "ball",
    "kite",
    "teddy bear",
    "book",
    "hat",
    "toy car",
    "shell",
    "drum",
    "balloon",
    "blanket",
    "puzzle",
    "toy boat",
    "doll",
    "cup",
    "scarf",
    "whistle",
    "toy train",
    "crayon",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "pink", "purple", "orange", "shiny", "big", "little", "soft",
];
const FOODS: &[&str] = &[
    "apple", "cookie", "sandwich", "pie", "carrot", "banana", "muffin", "pear",
];
const CAKES: &[&str] = &[
    "chocolate",
    "strawberry",
    "lemon",
    "apple",
    "banana",
    "carrot",
    "honey",
];
const SKILLS: &[(&str, &str)] = &[
    ("ride a bike", "rode the bike"),
    ("climb the tree", "climbed the tree"),
    ("swim in the lake", "swam in the lake"),
    ("fly a kite", "flew the kite"),
    ("jump over the puddle", "jumped over the puddle"),
    ("bake a cake", "baked a cake"),
    ("read a book", "read the book"),
    ("tie a shoe", "tied the shoe"),
    ("catch the ball", "caught the ball"),
    ("build a sandcastle", "built a sandcastle"),
];
const GAMES: &[&str] = &[
    "tag",
    "hide and seek",
    "catch",
    "house",
    "chase",
    "ball",
    "pretend",
];
const GOOD_FEELINGS: &[&str] = &["happy", "glad", "proud", "excited", "thankful"];
const BAD_FEELINGS: &[&str] = &["sad", "scared", "worried", "upset", "lonely"];
const OPENINGS: &[&str] = &[
    "Once upon a time,",
    "One day,",
    "One sunny morning,",
    "Long ago,",
    "One afternoon,",
    "On a warm day,",
    "One cold morning,",
];
const HELPERS: &[&str] = &["Mom", "Dad", "Grandma", "Grandpa", "the teacher"];

fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

struct Story<'r> {
    rng: &'r mut Rng,
    lines: Vec<String>,
}

impl Story<'_> {
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *self.rng.pick(items)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.rng.uniform() < p
    }
    fn say(&mut self, s: String) {
        self.lines.push(s);
    }
    fn hero(&mut self) -> Hero {
        let girl = self.chance(0.5);
        let name = if girl {
            self.pick(GIRLS)
        } else {
            self.pick(BOYS)
        };
        let kind = if self.chance(0.6) {
            if girl {
                self.pick(GIRL_KINDS)
            } else {
                self.pick(BOY_KINDS)
            }
        } else {
            self.pick(ANIMAL_KINDS)
        };
        let (he, his, him) = if girl {
            ("she", "her", "her")
        } else {
            ("he", "his", "him")
        };
        Hero {
            name,
            kind,
            he,
            his,
            him,
        }
    }
    fn friend(&mut self, hero: &Hero) -> Hero {
        loop {
            let f = self.hero();
            if f.name != hero.name {
                return f;
            }
        }
    }
    fn thing(&mut self) -> String {
        let color = self.pick(COLORS);
        let obj = self.pick(OBJECTS);
        format!("{color} {obj}")
    }

    fn introduce(&mut self, h: &Hero) {
        let opening = self.pick(OPENINGS);
        let trait_ = self.pick(TRAITS);
        let intro = match self.rng.below(3) {
            0 => format!(
                "{opening} there was {} {trait_} {} named {}.",
                article(trait_),
                h.kind,
                h.name
            ),
            1 => format!(
                "{opening} {} {} named {} lived near {}.",
                article(h.kind),
                h.kind,
                h.name,
                self.pick(PLACES)
            ),
            _ => format!(
                "{opening} {} was playing outside. {} was {} {trait_} {}.",
                h.name,
                capitalize(h.he),
                article(trait_),
                h.kind
            ),
        };
        self.say(intro);
    }

    fn lost_toy(&mut self, h: &Hero) {
        let f = self.friend(h);
        let thing = self.thing();
        let place = self.pick(PLACES);
        let spot = self.pick(SPOTS);
        let sad = self.pick(BAD_FEELINGS);
        let line = format!(
            "{} had {} {thing}. {} loved it very much.",
            h.name,
            article(&thing),
            capitalize(h.he)
        );
        self.say(line);
        let line = format!("One day, {} took the {thing} to {place}.", h.name);
        self.say(line);
        let line = format!(
            "{} played and played, but then the {thing} was gone!",
            capitalize(h.he)
        );
        self.say(line);
        let line = format!("{} felt very {sad}.", h.name);
        self.say(line);
        let line = format!(
            "{} the {} saw {} and asked, \"Why are you {sad}, {}?\"",
            f.name, f.kind, h.name, h.name
        );
        self.say(line);
        let line = format!("\"I lost my {thing},\" said {}.", h.name);
        self.say(line);
        let line = format!("\"Do not worry. I will help you look,\" said {}.", f.name);
        self.say(line);
        if self.chance(0.5) {
            let mut wrong = self.pick(SPOTS);
            while wrong == spot {
                wrong = self.pick(SPOTS);
            }
            let line = format!("They looked {wrong}, but it was not there.");
            self.say(line);
        }
        let line = format!("Then {} looked {spot}. There was the {thing}!", f.name);
        self.say(line);
        let good = self.pick(GOOD_FEELINGS);
        let line = format!(
            "{} was so {good}. \"Thank you, {}!\" {} said.",
            h.name, f.name, h.he
        );
        self.say(line);
        let line = format!(
            "From that day on, {} and {} were best friends.",
            h.name, f.name
        );
        self.say(line);
    }

    fn learn_skill(&mut self, h: &Hero) {
        let (skill, did) = self.pick(SKILLS);
        let helper = self.pick(HELPERS);
        let line = format!("{} wanted to {skill}, but it was hard.", h.name);
        self.say(line);
        let line = format!(
            "The first time, {} tried and fell down. {} felt {}.",
            h.he,
            capitalize(h.he),
            self.pick(BAD_FEELINGS)
        );
        self.say(line);
        let line = format!("\"I can not do it,\" {} said.", h.name);
        self.say(line);
        let line = format!(
            "{} smiled and said, \"Try again. Go slow and do not give up.\"",
            capitalize(helper)
        );
        self.say(line);
        if self.chance(0.5) {
            let line = format!("So {} tried again, and again, and again.", h.name);
            self.say(line);
        } else {
            let line = format!("{} took a deep breath and tried one more time.", h.name);
            self.say(line);
        }
        let line = format!("At last, {} {did}!", h.name);
        self.say(line);
        let good = self.pick(GOOD_FEELINGS);
        let line = format!(
            "{} was very {good}. \"I did it!\" {} shouted.",
            h.name, h.he
        );
        self.say(line);
        let line = format!(
            "{} learned that trying again is how you get better.",
            h.name
        );
        self.say(line);
    }

    fn sharing(&mut self, h: &Hero) {
        let f = self.friend(h);
        let thing = self.thing();
        let place = self.pick(PLACES);
        let line = format!(
            "{} had a new {thing}. {} played with it at {place}.",
            h.name,
            capitalize(h.he)
        );
        self.say(line);
        let line = format!(
            "{} came and said, \"Can I play with your {thing} too?\"",
            f.name
        );
        self.say(line);
        let line = format!(
            "\"No, it is mine!\" said {}. {} felt sad and walked away.",
            h.name, f.name
        );
        self.say(line);
        let line = format!("Soon {} was alone, and playing alone was not fun.", h.name);
        self.say(line);
        let line = format!(
            "{} ran to {} and said, \"I am sorry. Let us play together.\"",
            h.name, f.name
        );
        self.say(line);
        let game = self.pick(GAMES);
        let line = format!("They shared the {thing} and played {game} all day.");
        self.say(line);
        let line = format!(
            "{} learned that sharing makes everyone {}.",
            h.name,
            self.pick(GOOD_FEELINGS)
        );
        self.say(line);
    }

    fn help_animal(&mut self, h: &Hero) {
        let (animal, trouble, fix) = match self.rng.below(4) {
            0 => (
                "bird",
                "had a hurt wing",
                "wrapped the wing in a soft cloth",
            ),
            1 => (
                "kitten",
                "was stuck up in a tree",
                "got a ladder and helped it down",
            ),
            2 => ("puppy", "was lost and crying", "helped it find its home"),
            _ => (
                "duck",
                "was caught in some string",
                "took the string off very slowly",
            ),
        };
        let place = self.pick(PLACES);
        let food = self.pick(FOODS);
        let line = format!("{} went for a walk to {place}.", h.name);
        self.say(line);
        let line = format!(
            "There {} saw a little {animal}. The {animal} {trouble}.",
            h.he
        );
        self.say(line);
        let line = format!(
            "\"Oh no, poor {animal}!\" said {}. \"I will help you.\"",
            h.name
        );
        self.say(line);
        let line = format!("{} {fix}.", capitalize(h.he));
        self.say(line);
        let line = format!(
            "Then {} gave the {animal} a piece of {} {food}.",
            h.he,
            article(food)
        );
        self.say(line);
        let line = format!(
            "The {animal} was {} and did not feel {} anymore.",
            self.pick(GOOD_FEELINGS),
            self.pick(BAD_FEELINGS)
        );
        self.say(line);
        let line = format!(
            "After that, the {animal} came to visit {} every day.",
            h.name
        );
        self.say(line);
    }

    fn weather(&mut self, h: &Hero) {
        let f = self.friend(h);
        let place = self.pick(PLACES);
        let game = self.pick(GAMES);
        let line = format!("{} and {} went to {place} to play {game}.", h.name, f.name);
        self.say(line);
        let (storm, shelter, after) = match self.rng.below(3) {
            0 => (
                "big dark clouds came and it started to rain",
                "under a big tree",
                "a bright rainbow in the sky",
            ),
            1 => (
                "the wind blew very hard",
                "behind a big rock",
                "the sun come out again",
            ),
            _ => (
                "it started to snow",
                "inside a little shed",
                "the whole place white and pretty",
            ),
        };
        let line = format!("Suddenly, {storm}.");
        self.say(line);
        let line = format!("\"I am {}!\" said {}.", self.pick(BAD_FEELINGS), f.name);
        self.say(line);
        let line = format!("\"Come with me,\" said {}. They hid {shelter}.", h.name);
        self.say(line);
        let line = format!(
            "They held hands and waited. {} told a funny story, and they both laughed.",
            h.name
        );
        self.say(line);
        let line = format!("Soon it was over, and they saw {after}.");
        self.say(line);
        let line = format!(
            "\"That was an adventure!\" said {}. They went home {}.",
            f.name,
            self.pick(GOOD_FEELINGS)
        );
        self.say(line);
    }

    fn new_friend(&mut self, h: &Hero) {
        let f = self.friend(h);
        let place = self.pick(PLACES);
        let game = self.pick(GAMES);
        let line = format!(
            "{} was new in town and did not know anyone. {} felt {}.",
            h.name,
            capitalize(h.he),
            self.pick(BAD_FEELINGS)
        );
        self.say(line);
        let line = format!(
            "One day at {place}, {} saw {} {} playing {game}.",
            h.he,
            article(f.kind),
            f.kind
        );
        self.say(line);
        let line = format!("{} wanted to play too, but {} was shy.", h.name, h.he);
        self.say(line);
        let line = format!(
            "The {} looked up and said, \"Hi! My name is {}. Do you want to play?\"",
            f.kind, f.name
        );
        self.say(line);
        let line = format!("\"Yes, please!\" said {}.", h.name);
        self.say(line);
        let line = format!("They played {game} until the sun went down.");
        self.say(line);
        let line = format!(
            "{} was not {} anymore. {} had a new friend.",
            h.name,
            self.pick(BAD_FEELINGS),
            capitalize(h.he)
        );
        self.say(line);
    }

    fn surprise(&mut self, h: &Hero) {
        let helper = self.pick(HELPERS);
        let cake = self.pick(CAKES);
        let thing = self.thing();
        let line = format!("It was {}'s birthday, but nobody said anything.", h.name);
        self.say(line);
        let line = format!(
            "{} thought everyone forgot. {} felt {}.",
            h.name,
            capitalize(h.he),
            self.pick(BAD_FEELINGS)
        );
        self.say(line);
        let line = format!("Then {} said, \"Come to the kitchen, {}.\"", helper, h.name);
        self.say(line);
        let line = format!(
            "When {} opened the door, all {} friends shouted, \"Surprise!\"",
            h.he, h.his
        );
        self.say(line);
        let line = format!(
            "There was a big {cake} cake and {} {thing} for {}.",
            article(&thing),
            h.him
        );
        self.say(line);
        let line = format!(
            "{} smiled a big smile. It was the best birthday ever.",
            h.name
        );
        self.say(line);
    }

    fn discovery(&mut self, h: &Hero) {
        let place = self.pick(PLACES);
        let spot = self.pick(SPOTS);
        let thing = self.thing();
        let line = format!(
            "{} was playing at {place} when {} saw an old box {spot}.",
            h.name, h.he
        );
        self.say(line);
        let line = format!(
            "{} was very curious. \"What is inside?\" {} asked.",
            capitalize(h.he),
            h.he
        );
        self.say(line);
        let line = format!(
            "{} opened the box slowly. Inside, there was {} {thing} and a little note.",
            capitalize(h.he),
            article(&thing)
        );
        self.say(line);
        let line = "The note said, \"Please take good care of me.\"".to_string();
        self.say(line);
        let line = format!("{} took the {thing} home and kept it safe.", h.name);
        self.say(line);
        let line = format!("Every day, {} played with it and told it stories.", h.he);
        self.say(line);
    }
}

/// Story number `index` of the corpus of `seed`.
pub fn story(seed: u64, index: u64) -> String {
    let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ index);
    let mut s = Story {
        rng: &mut rng,
        lines: Vec::new(),
    };
    let hero = s.hero();
    s.introduce(&hero);
    match s.rng.below(8) {
        0 => s.lost_toy(&hero),
        1 => s.learn_skill(&hero),
        2 => s.sharing(&hero),
        3 => s.help_animal(&hero),
        4 => s.weather(&hero),
        5 => s.new_friend(&hero),
        6 => s.surprise(&hero),
        _ => s.discovery(&hero),
    }
    let mut out = String::new();
    for (i, line) in s.lines.iter().enumerate() {
        if i > 0 {
            // Paragraph breaks now and then, like real stories.
            out.push_str(if i % 4 == 0 { "\n\n" } else { " " });
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn stories_are_deterministic_distinct_and_plain() {
        assert_eq!(story(1, 5), story(1, 5));
        assert_ne!(story(1, 5), story(2, 5));
        let n = 20_000;
        let distinct: HashSet<String> = (0..n).map(|i| story(7, i)).collect();
        assert!(
            distinct.len() > n as usize * 99 / 100,
            "{} distinct",
            distinct.len()
        );
        for s in distinct.iter().take(200) {
            assert!(s.is_ascii());
            assert!(!s.contains("  "));
            assert!(
                s.ends_with('.') || s.ends_with('!') || s.ends_with('"'),
                "{s}"
            );
            assert!(
                !s.contains(" a a") && !s.contains(" a e") && !s.contains(" a o"),
                "{s}"
            );
        }
    }
}
